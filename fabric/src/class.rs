//! Traffic classes and priorities.

/// The class of a channel: what kind of traffic it carries. Classes are served in strict priority
/// order (coordination first, then tool calls, then bulk) with anti-starvation promotion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Class {
    /// Small ordered messages between orchestrators and subagents; tail latency matters most.
    Coordination = 0,
    /// Request/response to tools and services.
    ToolCall = 1,
    /// Large data (KV-cache blocks, results); bandwidth matters, and it yields to the others.
    Bulk = 2,
}

impl Class {
    /// Every class, highest scheduling precedence first.
    pub const ALL: [Class; 3] = [Class::Coordination, Class::ToolCall, Class::Bulk];

    /// Index of the class in [`Class::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The class with the given wire value.
    pub fn from_u8(v: u8) -> Option<Class> {
        match v {
            0 => Some(Class::Coordination),
            1 => Some(Class::ToolCall),
            2 => Some(Class::Bulk),
            _ => None,
        }
    }

    /// Lower-case name, as used in metrics and the command line.
    pub fn name(self) -> &'static str {
        match self {
            Class::Coordination => "coordination",
            Class::ToolCall => "toolcall",
            Class::Bulk => "bulk",
        }
    }
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Priority of a channel within its class, 0 (lowest) to 7 (highest). Inside a class, channels
/// share the link by weighted round-robin with weight `priority + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Priority(u8);

impl Priority {
    /// The lowest priority.
    pub const MIN: Priority = Priority(0);
    /// The highest priority.
    pub const MAX: Priority = Priority(7);
    /// The default priority (3).
    pub const DEFAULT: Priority = Priority(3);

    /// A priority from 0 to 7; `None` otherwise.
    pub fn new(p: u8) -> Option<Priority> {
        (p <= 7).then_some(Priority(p))
    }

    /// The numeric priority.
    pub fn get(self) -> u8 {
        self.0
    }

    /// Round-robin weight: chunks served per turn.
    pub fn weight(self) -> u32 {
        u32::from(self.0) + 1
    }
}

impl Default for Priority {
    fn default() -> Self {
        Priority::DEFAULT
    }
}
