//! The tool-call envelopes carried in request bodies (see "Wire format" in the module docs):
//! a call (tool, arguments, deadline budget, call id, idempotency key, flags) or a cancel of a
//! call id.
//!
//! Imports: nothing from the rest of the module or the crate.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

const MAGIC: &[u8; 2] = b"TC";
const VERSION: u8 = 1;
pub(super) const KIND_CALL: u8 = 1;
pub(super) const KIND_CANCEL: u8 = 2;
pub(super) const FLAG_IDEMPOTENT: u8 = 1;
const HEAD: usize = 2 + 1 + 1 + 1 + 4 + 8;

/// A decoded request or cancel.
pub(super) struct Envelope {
    pub(super) kind: u8,
    pub(super) flags: u8,
    pub(super) budget: Duration,
    pub(super) call_id: u64,
    pub(super) key: Bytes,
    pub(super) tool: String,
    pub(super) args: Bytes,
}

/// The body of a call.
pub(super) fn encode_call(
    call_id: u64,
    budget: Duration,
    flags: u8,
    key: &[u8],
    tool: &str,
    args: &[u8],
) -> Bytes {
    let mut b = BytesMut::with_capacity(HEAD + 4 + key.len() + tool.len() + args.len());
    b.put_slice(MAGIC);
    b.put_u8(VERSION);
    b.put_u8(KIND_CALL);
    b.put_u8(flags);
    b.put_u32_le(u32::try_from(budget.as_micros()).unwrap_or(u32::MAX));
    b.put_u64_le(call_id);
    b.put_u16_le(key.len() as u16);
    b.put_slice(key);
    b.put_u16_le(tool.len() as u16);
    b.put_slice(tool.as_bytes());
    b.put_slice(args);
    b.freeze()
}

/// The body of a cancel of call `call_id`.
pub(super) fn encode_cancel(call_id: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(HEAD);
    b.put_slice(MAGIC);
    b.put_u8(VERSION);
    b.put_u8(KIND_CANCEL);
    b.put_u8(0);
    b.put_u32_le(0);
    b.put_u64_le(call_id);
    b.freeze()
}

/// Decodes a request or cancel body; the error is the reason a request is refused with.
pub(super) fn decode(body: &Bytes) -> Result<Envelope, String> {
    if body.len() < HEAD || &body[..2] != MAGIC {
        return Err("not a tool-call message".into());
    }
    if body[2] != VERSION {
        return Err(format!("tool-call version {} not supported", body[2]));
    }
    let kind = body[3];
    let flags = body[4];
    let budget = Duration::from_micros(u64::from(u32::from_le_bytes(
        body[5..9].try_into().expect("4 bytes"),
    )));
    let call_id = u64::from_le_bytes(body[9..17].try_into().expect("8 bytes"));
    let mut env = Envelope {
        kind,
        flags,
        budget,
        call_id,
        key: Bytes::new(),
        tool: String::new(),
        args: Bytes::new(),
    };
    if kind == KIND_CANCEL {
        return Ok(env);
    }
    if kind != KIND_CALL {
        return Err(format!("unknown tool-call message kind {kind}"));
    }
    let mut at = HEAD;
    let mut field = |what: &str| -> Result<Bytes, String> {
        let len = body
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
            .ok_or_else(|| format!("truncated {what} length"))?;
        let v = body
            .get(at + 2..at + 2 + len)
            .ok_or_else(|| format!("truncated {what}"))?;
        let v = body.slice_ref(v);
        at += 2 + len;
        Ok(v)
    };
    env.key = field("idempotency key")?;
    let tool = field("tool name")?;
    env.tool = std::str::from_utf8(&tool)
        .map_err(|_| "tool name is not UTF-8".to_owned())?
        .to_owned();
    env.args = body.slice(at..);
    Ok(env)
}
