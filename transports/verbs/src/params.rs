//! The connection parameters two verbs endpoints exchange over the TCP side channel, their wire
//! encoding, and the checks that turn every incompatibility into an error naming the setting and
//! the fix. Pure code: no device needed, fully unit-tested.

use std::fmt;
use std::net::Ipv4Addr;

/// Magic that opens every side-channel message ("AFVB": agentfabric verbs).
pub const MAGIC: [u8; 4] = *b"AFVB";
/// Version of the side-channel exchange and of the data-path conventions (immediate data
/// layout, credits). Both ends must speak the same.
pub const PROTOCOL_VERSION: u16 = 5;
/// Encoded length of [`QpParams`].
pub const PARAMS_LEN: usize = 128;
/// Longest device name carried (longer names are cut; only used in messages).
const NAME_LEN: usize = 32;

/// Link layer of a port (`ibv_port_attr::link_layer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkLayer {
    /// Unspecified (treated as InfiniBand by rdma-core).
    Unspecified,
    /// InfiniBand: addressed by LID.
    InfiniBand,
    /// Ethernet (RoCE): addressed by GID.
    Ethernet,
}

impl LinkLayer {
    pub(crate) fn from_u8(v: u8) -> LinkLayer {
        match v {
            1 => LinkLayer::InfiniBand,
            2 => LinkLayer::Ethernet,
            _ => LinkLayer::Unspecified,
        }
    }
    pub(crate) fn to_u8(self) -> u8 {
        match self {
            LinkLayer::Unspecified => 0,
            LinkLayer::InfiniBand => 1,
            LinkLayer::Ethernet => 2,
        }
    }
}

impl fmt::Display for LinkLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinkLayer::Unspecified => "unspecified",
            LinkLayer::InfiniBand => "InfiniBand",
            LinkLayer::Ethernet => "Ethernet (RoCE)",
        })
    }
}

/// Type of a GID table entry (from sysfs `gid_attrs/types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GidType {
    /// Not known (no sysfs entry).
    Unknown,
    /// InfiniBand or RoCE v1 (RoCE v1 is not routable: same L2 segment only).
    IbRoceV1,
    /// RoCE v2 (UDP/IP encapsulated, routable).
    RoceV2,
}

impl GidType {
    pub(crate) fn from_u8(v: u8) -> GidType {
        match v {
            1 => GidType::IbRoceV1,
            2 => GidType::RoceV2,
            _ => GidType::Unknown,
        }
    }
    pub(crate) fn to_u8(self) -> u8 {
        match self {
            GidType::Unknown => 0,
            GidType::IbRoceV1 => 1,
            GidType::RoceV2 => 2,
        }
    }
    /// Parses sysfs text ("RoCE v2", "IB/RoCE v1").
    pub fn parse_sysfs(s: &str) -> GidType {
        let s = s.trim();
        if s.eq_ignore_ascii_case("RoCE v2") {
            GidType::RoceV2
        } else if s.contains("v1") || s == "IB" {
            GidType::IbRoceV1
        } else {
            GidType::Unknown
        }
    }
}

impl fmt::Display for GidType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GidType::Unknown => "unknown type",
            GidType::IbRoceV1 => "IB/RoCE v1",
            GidType::RoceV2 => "RoCE v2",
        })
    }
}

/// A 16-byte GID, printable.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Gid(pub [u8; 16]);

impl Gid {
    /// All zeros: an empty GID table entry.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }
    /// The IPv4 address of an IPv4-mapped GID (`::ffff:a.b.c.d`).
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        let g = &self.0;
        (g[..10] == [0; 10] && g[10] == 0xff && g[11] == 0xff)
            .then(|| Ipv4Addr::new(g[12], g[13], g[14], g[15]))
    }
    /// An IPv6 link-local GID (`fe80::/64`), only reachable on the same L2 segment.
    pub fn is_link_local(&self) -> bool {
        self.0[0] == 0xfe && (self.0[1] & 0xc0) == 0x80
    }
    fn family(&self) -> &'static str {
        if self.ipv4().is_some() {
            "IPv4-mapped"
        } else if self.is_link_local() {
            "IPv6 link-local"
        } else {
            "IPv6"
        }
    }
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, pair) in self.0.chunks(2).enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{:02x}{:02x}", pair[0], pair[1])?;
        }
        if let Some(v4) = self.ipv4() {
            write!(f, " ({v4})")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// MTU in bytes of an `ibv_mtu` code (1 = 256 ... 5 = 4096); 0 for an unknown code.
pub fn mtu_bytes(code: u8) -> u32 {
    match code {
        1..=5 => 128 << code,
        _ => 0,
    }
}

/// The `ibv_mtu` code of an MTU in bytes (256, 512, 1024, 2048, 4096).
pub fn mtu_code(bytes: u32) -> Option<u8> {
    (1..=5u8).find(|&c| mtu_bytes(c) == bytes)
}

/// One endpoint's queue-pair parameters, as exchanged on the side channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QpParams {
    /// Exchange/data-path protocol version ([`PROTOCOL_VERSION`]).
    pub version: u16,
    /// Queue pair number.
    pub qpn: u32,
    /// Initial packet sequence number (24 bits).
    pub psn: u32,
    /// Queue pair number of the second QP, which carries one-sided operations (RDMA WRITE and
    /// READ) apart from the frames, so coordination never queues behind a bulk block.
    pub rma_qpn: u32,
    /// Initial packet sequence number of that QP (24 bits).
    pub rma_psn: u32,
    /// LID of the port (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// The GID this endpoint sends from.
    pub gid: Gid,
    /// Index of that GID in the port's table.
    pub gid_index: u8,
    /// Type of that GID.
    pub gid_type: GidType,
    /// Link layer of the port.
    pub link_layer: LinkLayer,
    /// The port's active MTU (`ibv_mtu` code).
    pub active_mtu: u8,
    /// The MTU this endpoint insists on (`ibv_mtu` code), or 0 to accept the smaller of the two
    /// active MTUs.
    pub required_mtu: u8,
    /// Minimum RNR NAK timer this endpoint's QP advertises (`ibv` code, 1..=31; 0 means 655 ms).
    pub min_rnr_timer: u8,
    /// Transport retry count (0..=7).
    pub retry_cnt: u8,
    /// RNR retry count (0..=7; 7 = infinite).
    pub rnr_retry: u8,
    /// Local ACK timeout code (4.096 µs × 2^timeout).
    pub timeout: u8,
    /// Receive buffers this endpoint posts: the credits its peer may use.
    pub recv_depth: u32,
    /// Size of each receive buffer in bytes: the largest frame (header + payload) it accepts.
    pub recv_buf_size: u32,
    /// Send queue depth.
    pub send_depth: u32,
    /// RDMA READs this endpoint's QPs accept in flight as the target: the peer issues at most
    /// this many at once (1..=255).
    pub reads_in: u8,
    /// Device name (for messages only).
    pub device: String,
    /// Port number (for messages only).
    pub port: u8,
}

impl QpParams {
    /// Encodes to the fixed [`PARAMS_LEN`]-byte little-endian layout.
    pub fn encode(&self) -> [u8; PARAMS_LEN] {
        let mut b = [0u8; PARAMS_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6] = 1; // message kind: parameters
        b[7] = self.port;
        b[8..12].copy_from_slice(&self.qpn.to_le_bytes());
        b[12..16].copy_from_slice(&self.psn.to_le_bytes());
        b[16..18].copy_from_slice(&self.lid.to_le_bytes());
        b[18] = self.gid_index;
        b[19] = self.gid_type.to_u8();
        b[20..36].copy_from_slice(&self.gid.0);
        b[36] = self.link_layer.to_u8();
        b[37] = self.active_mtu;
        b[38] = self.required_mtu;
        b[39] = self.min_rnr_timer;
        b[40] = self.retry_cnt;
        b[41] = self.rnr_retry;
        b[42] = self.timeout;
        b[44..48].copy_from_slice(&self.recv_depth.to_le_bytes());
        b[48..52].copy_from_slice(&self.recv_buf_size.to_le_bytes());
        b[52..56].copy_from_slice(&self.send_depth.to_le_bytes());
        let name = self.device.as_bytes();
        let n = name.len().min(NAME_LEN);
        b[56..56 + n].copy_from_slice(&name[..n]);
        b[88..92].copy_from_slice(&self.rma_qpn.to_le_bytes());
        b[92..96].copy_from_slice(&self.rma_psn.to_le_bytes());
        b[96] = self.reads_in;
        b
    }

    /// Decodes what [`QpParams::encode`] wrote. Total: wrong magic, version or kind is an error
    /// that says what the other end seems to be.
    pub fn decode(b: &[u8; PARAMS_LEN]) -> Result<QpParams, Mismatch> {
        if b[0..4] != MAGIC {
            return Err(Mismatch::NotVerbsPeer {
                got: b[0..4].try_into().expect("4 bytes"),
            });
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != PROTOCOL_VERSION {
            return Err(Mismatch::Version {
                local: PROTOCOL_VERSION,
                remote: version,
            });
        }
        if b[6] == 2 {
            let len = usize::from(u16::from_le_bytes([b[8], b[9]])).min(PARAMS_LEN - 10);
            return Err(Mismatch::Refused(
                String::from_utf8_lossy(&b[10..10 + len]).into_owned(),
            ));
        }
        if b[6] != 1 {
            return Err(Mismatch::Malformed(format!(
                "unknown side-channel message kind {}",
                b[6]
            )));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let name_end = b[56..56 + NAME_LEN]
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(NAME_LEN);
        Ok(QpParams {
            version,
            port: b[7],
            qpn: u32_at(8),
            psn: u32_at(12),
            rma_qpn: u32_at(88),
            rma_psn: u32_at(92),
            lid: u16::from_le_bytes([b[16], b[17]]),
            gid_index: b[18],
            gid_type: GidType::from_u8(b[19]),
            gid: Gid(b[20..36].try_into().expect("16 bytes")),
            link_layer: LinkLayer::from_u8(b[36]),
            active_mtu: b[37],
            required_mtu: b[38],
            min_rnr_timer: b[39],
            retry_cnt: b[40],
            rnr_retry: b[41],
            timeout: b[42],
            recv_depth: u32_at(44),
            recv_buf_size: u32_at(48),
            send_depth: u32_at(52),
            // A peer that says 0 still takes one.
            reads_in: b[96].max(1),
            device: String::from_utf8_lossy(&b[56..56 + name_end]).into_owned(),
        })
    }

    fn who(&self) -> String {
        format!(
            "{} port {} GID index {}",
            self.device, self.port, self.gid_index
        )
    }
}

/// Encodes a refusal: the acceptor found the initiator's parameters incompatible and says why.
pub fn encode_refusal(reason: &str) -> [u8; PARAMS_LEN] {
    let mut b = [0u8; PARAMS_LEN];
    b[0..4].copy_from_slice(&MAGIC);
    b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    b[6] = 2;
    let r = reason.as_bytes();
    let mut n = r.len().min(PARAMS_LEN - 10);
    while n > 0 && !reason.is_char_boundary(n) {
        n -= 1;
    }
    b[8..10].copy_from_slice(&(n as u16).to_le_bytes());
    b[10..10 + n].copy_from_slice(&r[..n]);
    b
}

/// One rail's one-sided QP as its end describes it (see `VerbsConfig::rails`). After the
/// [`QpParams`] exchange each end sends [`encode_rails`] of its rails; rail *k* connects to the
/// peer's rail *k*, as many as both ends have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RailParams {
    /// The rail QP's number.
    pub qpn: u32,
    /// Its initial packet sequence number.
    pub psn: u32,
    /// Port LID (InfiniBand).
    pub lid: u16,
    /// The GID the rail's QP uses.
    pub gid: Gid,
    /// Its index in the port's GID table.
    pub gid_index: u8,
    /// The port's active MTU (`ibv_mtu` code).
    pub active_mtu: u8,
    /// RDMA READs the device serves in flight.
    pub reads_in: u8,
    /// The port's link layer.
    pub link_layer: LinkLayer,
}

/// Encoded length of one [`RailParams`].
pub const RAIL_PARAMS_LEN: usize = 28;

impl RailParams {
    fn encode_into(&self, b: &mut [u8]) {
        b[0..4].copy_from_slice(&self.qpn.to_le_bytes());
        b[4..8].copy_from_slice(&self.psn.to_le_bytes());
        b[8..10].copy_from_slice(&self.lid.to_le_bytes());
        b[10..26].copy_from_slice(&self.gid.0);
        b[26] = self.gid_index;
        b[27] = self.active_mtu | (self.link_layer.to_u8() << 4);
    }

    fn decode(b: &[u8], reads_in: u8) -> RailParams {
        RailParams {
            qpn: u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
            psn: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            lid: u16::from_le_bytes(b[8..10].try_into().expect("2 bytes")),
            gid: Gid(b[10..26].try_into().expect("16 bytes")),
            gid_index: b[26],
            active_mtu: b[27] & 0x0f,
            link_layer: LinkLayer::from_u8(b[27] >> 4),
            reads_in,
        }
    }
}

/// The rails message: a count, then for each rail its [`RailParams`] and its READ depth.
pub fn encode_rails(rails: &[RailParams]) -> Vec<u8> {
    let mut out = vec![0u8; 1 + rails.len() * (RAIL_PARAMS_LEN + 1)];
    out[0] = rails.len() as u8;
    for (k, r) in rails.iter().enumerate() {
        let at = 1 + k * (RAIL_PARAMS_LEN + 1);
        r.encode_into(&mut out[at..at + RAIL_PARAMS_LEN]);
        out[at + RAIL_PARAMS_LEN] = r.reads_in;
    }
    out
}

/// Bytes of a rails message with `count` rails (its first byte).
pub fn rails_len(count: u8) -> usize {
    1 + usize::from(count) * (RAIL_PARAMS_LEN + 1)
}

/// Decodes [`encode_rails`]'s output (exactly [`rails_len`] of its first byte). A count above
/// `max` is malformed.
pub fn decode_rails(b: &[u8], max: usize) -> Result<Vec<RailParams>, Mismatch> {
    let Some(&count) = b.first() else {
        return Err(Mismatch::Malformed("empty rails message".into()));
    };
    if usize::from(count) > max {
        return Err(Mismatch::Malformed(format!(
            "the peer offers {count} rails; at most {max} are supported"
        )));
    }
    if b.len() != rails_len(count) {
        return Err(Mismatch::Malformed(format!(
            "a rails message of {} bytes for {count} rails",
            b.len()
        )));
    }
    Ok((0..usize::from(count))
        .map(|k| {
            let at = 1 + k * (RAIL_PARAMS_LEN + 1);
            RailParams::decode(&b[at..at + RAIL_PARAMS_LEN], b[at + RAIL_PARAMS_LEN].max(1))
        })
        .collect())
}

/// The path MTU of rail pair (`local`, `remote`): the smaller active MTU, and no more than
/// `required` (an `ibv_mtu` code, 0 for none). An error when their link layers differ.
pub fn rail_path_mtu(
    local: &RailParams,
    remote: &RailParams,
    required: u8,
) -> Result<u8, Mismatch> {
    if local.link_layer != remote.link_layer {
        return Err(Mismatch::Setting(format!(
            "a rail's link layers differ ({} here, {} on the peer): rails pair up by position, \
             so list VerbsConfig::rails (AGENTFABRIC_RAILS) in the same order on both ends",
            local.link_layer, remote.link_layer
        )));
    }
    let mtu = local.active_mtu.min(remote.active_mtu);
    Ok(if required > 0 { mtu.min(required) } else { mtu })
}

/// What the two ends agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Path MTU (`ibv_mtu` code) for the QP.
    pub path_mtu: u8,
    /// Frames this end may send before the peer returns credits (= the peer's receive buffers).
    pub send_credits: u32,
}

/// An incompatibility between two endpoints' settings, or a broken exchange. Its text names
/// the setting and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// The side channel did not start with the verbs magic: not an agentfabric verbs listener.
    NotVerbsPeer {
        /// The first four bytes received.
        got: [u8; 4],
    },
    /// Different protocol versions.
    Version {
        /// This build's.
        local: u16,
        /// The peer's.
        remote: u16,
    },
    /// The peer refused our parameters; its reason.
    Refused(String),
    /// A malformed message.
    Malformed(String),
    /// Anything else: a complete sentence naming the setting and the fix.
    Setting(String),
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::NotVerbsPeer { got } => write!(
                f,
                "the peer is not an agentfabric verbs endpoint (side channel opened with {:?}, \
                 expected \"AFVB\"): check the address and port, and that the peer listens \
                 with verbs://",
                String::from_utf8_lossy(got)
            ),
            Mismatch::Version { local, remote } => write!(
                f,
                "verbs protocol version mismatch: this node speaks {local}, the peer {remote}: \
                 run the same agentfabric version on both"
            ),
            Mismatch::Refused(why) => write!(f, "the peer refused the connection: {why}"),
            Mismatch::Malformed(why) => write!(f, "malformed verbs side-channel message: {why}"),
            Mismatch::Setting(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for Mismatch {}

/// Checks the two ends' parameters against each other and agrees on the path MTU and credits.
/// `local` is this end. Symmetric: both ends reach the same verdict.
pub fn negotiate(local: &QpParams, remote: &QpParams) -> Result<Negotiated, Mismatch> {
    let set = |s: String| Err(Mismatch::Setting(s));
    if local.link_layer != remote.link_layer {
        return set(format!(
            "link layer mismatch: local {} is {}, peer's {} is {}: both ends must be RoCE or \
             both InfiniBand (choose another device with AGENTFABRIC_LAB_DEVICE / \
             VerbsConfig::device)",
            local.who(),
            local.link_layer,
            remote.who(),
            remote.link_layer
        ));
    }
    if local.link_layer == LinkLayer::Ethernet {
        for (side, p) in [("local", local), ("peer's", remote)] {
            if p.gid.is_zero() {
                return set(format!(
                    "wrong GID index: the {side} GID index {} on {} port {} is empty (all \
                     zeros): choose a populated RoCE v2 IPv4 entry (see `agentfabric info` or \
                     `ibv_devinfo -v`) and set AGENTFABRIC_LAB_GID_INDEX / VerbsConfig::gid_index",
                    p.gid_index, p.device, p.port
                ));
            }
        }
        if local.gid_type != remote.gid_type
            && local.gid_type != GidType::Unknown
            && remote.gid_type != GidType::Unknown
        {
            return set(format!(
                "wrong GID index: local {} is {}, peer's {} is {}: both ends must use the same \
                 RoCE version; set AGENTFABRIC_LAB_GID_INDEX / VerbsConfig::gid_index to the \
                 RoCE v2 IPv4-mapped GID on both nodes (see `agentfabric info`)",
                local.who(),
                local.gid_type,
                remote.who(),
                remote.gid_type
            ));
        }
        if local.gid.ipv4().is_some() != remote.gid.ipv4().is_some() {
            return set(format!(
                "wrong GID index: local {} is {} ({}), peer's {} is {} ({}): the two GIDs are of \
                 different address families and cannot reach each other; set \
                 AGENTFABRIC_LAB_GID_INDEX / VerbsConfig::gid_index to the RoCE v2 IPv4-mapped \
                 GID on both nodes",
                local.who(),
                local.gid,
                local.gid.family(),
                remote.who(),
                remote.gid,
                remote.gid.family()
            ));
        }
    } else if local.lid == 0 || remote.lid == 0 {
        return set(format!(
            "InfiniBand port without a LID (local {} LID {}, peer's {} LID {}): is a subnet \
             manager running (opensm)?",
            local.who(),
            local.lid,
            remote.who(),
            remote.lid
        ));
    }
    for (side, p) in [("local", local), ("peer's", remote)] {
        if mtu_bytes(p.active_mtu) == 0 {
            return set(format!(
                "the {side} port's active MTU code {} is invalid ({} port {})",
                p.active_mtu, p.device, p.port
            ));
        }
        if p.required_mtu != 0 && mtu_bytes(p.required_mtu) == 0 {
            return set(format!(
                "the {side} required MTU code {} is invalid: VerbsConfig::mtu must be one of \
                 256, 512, 1024, 2048, 4096",
                p.required_mtu
            ));
        }
    }
    let path = local.active_mtu.min(remote.active_mtu);
    let path_mtu = match (local.required_mtu, remote.required_mtu) {
        (0, 0) => path,
        (a, b) if a != 0 && b != 0 && a != b => {
            return set(format!(
                "path MTU mismatch: this node requires MTU {} and the peer requires {}: set \
                 VerbsConfig::mtu to the same value on both, or to None to use the smaller \
                 active MTU ({})",
                mtu_bytes(a),
                mtu_bytes(b),
                mtu_bytes(path)
            ));
        }
        (a, b) => {
            let (req, who) = if a != 0 {
                (a, "this node")
            } else {
                (b, "the peer")
            };
            if req > path {
                let (small, small_who) = if local.active_mtu <= remote.active_mtu {
                    (local.active_mtu, local.who())
                } else {
                    (remote.active_mtu, remote.who())
                };
                return set(format!(
                    "path MTU mismatch: {who} requires MTU {} but {small_who} runs active MTU \
                     {}: raise that port's netdev MTU (ip link set DEV mtu …; RoCE MTU is the \
                     netdev MTU less headers, rounded down) or set VerbsConfig::mtu to None to \
                     negotiate",
                    mtu_bytes(req),
                    mtu_bytes(small)
                ));
            }
            req
        }
    };
    if local.recv_buf_size != remote.recv_buf_size {
        return set(format!(
            "receive buffer size mismatch: this node posts {} byte buffers, the peer {} bytes: \
             set VerbsConfig::recv_buffer_size to the same value on both nodes (it fixes the \
             largest frame either side may send)",
            local.recv_buf_size, remote.recv_buf_size
        ));
    }
    for (side, p) in [("local", local), ("peer's", remote)] {
        if p.min_rnr_timer == 0 || p.min_rnr_timer > 31 {
            return set(format!(
                "the {side} RNR timer code is {} ({}): 0 means a 655 ms stall on every \
                 receiver-not-ready; set VerbsConfig::min_rnr_timer to 1..=31 (default 12, \
                 0.64 ms)",
                p.min_rnr_timer,
                if p.min_rnr_timer == 0 {
                    "655 ms"
                } else {
                    "out of range"
                }
            ));
        }
        if p.recv_depth < 2 {
            return set(format!(
                "the {side} receive depth is {}: at least 2 receive buffers are needed (one is \
                 kept for credit returns); raise VerbsConfig::recv_depth",
                p.recv_depth
            ));
        }
    }
    if local.retry_cnt != remote.retry_cnt || local.timeout != remote.timeout {
        return set(format!(
            "retry settings mismatch: this node uses retry count {} and ACK timeout code {}, \
             the peer {} and {}: failure detection would differ by direction; set \
             VerbsConfig::retry_count and VerbsConfig::ack_timeout the same on both",
            local.retry_cnt, local.timeout, remote.retry_cnt, remote.timeout
        ));
    }
    if local.rnr_retry != remote.rnr_retry {
        return set(format!(
            "RNR retry mismatch: this node {}, the peer {}: set VerbsConfig::rnr_retry the same \
             on both",
            local.rnr_retry, remote.rnr_retry
        ));
    }
    Ok(Negotiated {
        path_mtu,
        send_credits: remote.recv_depth,
    })
}

/// Immediate data of every SEND: the receive buffers the sender returns to the peer (credits)
/// and whether this is the sender's last message.
pub mod imm {
    /// The sender closes its direction after this message.
    pub const FIN: u32 = 1 << 31;
    /// Mask of the returned-credits count.
    pub const CREDITS: u32 = 0xffff;

    /// Immediate value returning `credits` (at most [`CREDITS`]), with `fin`.
    pub fn encode(credits: u32, fin: bool) -> u32 {
        credits.min(CREDITS) | if fin { FIN } else { 0 }
    }
    /// (credits returned, fin).
    pub fn decode(v: u32) -> (u32, bool) {
        (v & CREDITS, v & FIN != 0)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn rails_round_trip_and_bad_rails_messages_are_refused() {
        let rail = |k: u8| RailParams {
            qpn: 0x11_2233 + u32::from(k),
            psn: 0x44_5566,
            lid: 7,
            gid: Gid([k; 16]),
            gid_index: 1,
            active_mtu: 3,
            reads_in: 16,
            link_layer: LinkLayer::Ethernet,
        };
        let rails = vec![rail(1), rail(2)];
        let wire = encode_rails(&rails);
        assert_eq!(wire.len(), rails_len(2));
        assert_eq!(decode_rails(&wire, 4).unwrap(), rails);
        assert_eq!(decode_rails(&encode_rails(&[]), 4).unwrap(), vec![]);
        assert!(matches!(
            decode_rails(&wire, 1),
            Err(Mismatch::Malformed(_))
        ));
        assert!(matches!(
            decode_rails(&wire[..wire.len() - 1], 4),
            Err(Mismatch::Malformed(_))
        ));
        assert!(matches!(decode_rails(&[], 4), Err(Mismatch::Malformed(_))));
        let mut ib = rail(3);
        ib.link_layer = LinkLayer::InfiniBand;
        let e = rail_path_mtu(&rail(1), &ib, 0).unwrap_err().to_string();
        assert!(e.contains("AGENTFABRIC_RAILS"), "{e}");
        let mut small = rail(4);
        small.active_mtu = 2;
        assert_eq!(rail_path_mtu(&rail(1), &small, 0).unwrap(), 2);
        assert_eq!(rail_path_mtu(&rail(1), &rail(2), 1).unwrap(), 1);
    }
    use super::*;

    fn roce(gid_index: u8) -> QpParams {
        QpParams {
            version: PROTOCOL_VERSION,
            qpn: 0x11,
            psn: 0x123456,
            rma_qpn: 0x43,
            rma_psn: 0x654321,
            lid: 0,
            gid: Gid([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 77, 0, 1]),
            gid_index,
            gid_type: GidType::RoceV2,
            link_layer: LinkLayer::Ethernet,
            active_mtu: 3,
            required_mtu: 0,
            min_rnr_timer: 12,
            retry_cnt: 7,
            rnr_retry: 7,
            timeout: 14,
            recv_depth: 32,
            recv_buf_size: 65536,
            send_depth: 64,
            reads_in: 16,
            device: "rxe0".into(),
            port: 1,
        }
    }

    fn err(a: &QpParams, b: &QpParams) -> String {
        let e1 = negotiate(a, b).unwrap_err().to_string();
        // Symmetric verdict.
        assert!(negotiate(b, a).is_err(), "only one side refused: {e1}");
        e1
    }

    #[test]
    fn round_trip() {
        let p = roce(1);
        let b = p.encode();
        assert_eq!(QpParams::decode(&b).unwrap(), p);
        let mut long = roce(3);
        long.device = "a-very-long-device-name-that-does-not-fit-in-32-bytes".into();
        let back = QpParams::decode(&long.encode()).unwrap();
        assert_eq!(back.device, &long.device[..32]);
    }

    #[test]
    fn layout_is_fixed() {
        let b = roce(1).encode();
        assert_eq!(&b[0..4], b"AFVB");
        assert_eq!(u16::from_le_bytes([b[4], b[5]]), PROTOCOL_VERSION);
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 0x11);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 0x123456);
        assert_eq!(b[18], 1);
        assert_eq!(&b[32..36], &[10, 77, 0, 1]);
        assert_eq!(u32::from_le_bytes(b[48..52].try_into().unwrap()), 65536);
        assert_eq!(&b[56..60], b"rxe0");
        assert_eq!(b[96], 16);
    }

    #[test]
    fn decode_refuses_other_protocols_and_versions() {
        let mut b = [0u8; PARAMS_LEN];
        b[..4].copy_from_slice(b"GET ");
        let e = QpParams::decode(&b).unwrap_err();
        assert!(
            e.to_string().contains("not an agentfabric verbs endpoint"),
            "{e}"
        );
        let mut b = roce(1).encode();
        b[4] = 9;
        let e = QpParams::decode(&b).unwrap_err();
        assert_eq!(
            e,
            Mismatch::Version {
                local: PROTOCOL_VERSION,
                remote: 9
            }
        );
        assert!(e.to_string().contains("same agentfabric version"));
        let mut b = roce(1).encode();
        b[6] = 7;
        assert!(matches!(QpParams::decode(&b), Err(Mismatch::Malformed(_))));
    }

    #[test]
    fn refusal_round_trip_and_truncation() {
        let e = QpParams::decode(&encode_refusal("MTU too small")).unwrap_err();
        assert_eq!(e, Mismatch::Refused("MTU too small".into()));
        let long = "é".repeat(200);
        match QpParams::decode(&encode_refusal(&long)).unwrap_err() {
            Mismatch::Refused(s) => assert!(!s.is_empty() && long.starts_with(&s)),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn compatible_ends_agree_on_smaller_mtu_and_credits() {
        let a = roce(1);
        let mut b = roce(1);
        b.active_mtu = 5;
        b.recv_depth = 16;
        let n = negotiate(&a, &b).unwrap();
        assert_eq!(n.path_mtu, 3);
        assert_eq!(n.send_credits, 16);
        assert_eq!(negotiate(&b, &a).unwrap().send_credits, 32);
    }

    #[test]
    fn empty_gid_names_the_gid_index() {
        let a = roce(1);
        let mut b = roce(3);
        b.gid = Gid::default();
        let e = err(&a, &b);
        assert!(
            e.contains("wrong GID index") && e.contains("GID index 3"),
            "{e}"
        );
        assert!(e.contains("AGENTFABRIC_LAB_GID_INDEX"), "{e}");
    }

    #[test]
    fn roce_version_mismatch_names_the_gid_index() {
        let a = roce(1);
        let mut b = roce(0);
        b.gid_type = GidType::IbRoceV1;
        let e = err(&a, &b);
        assert!(e.contains("RoCE v2") && e.contains("IB/RoCE v1"), "{e}");
        assert!(e.contains("GID index 0"), "{e}");
    }

    #[test]
    fn gid_family_mismatch_is_wrong_gid_index() {
        let a = roce(1);
        let mut b = roce(0);
        b.gid = Gid([0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]);
        let e = err(&a, &b);
        assert!(
            e.contains("IPv6 link-local") && e.contains("IPv4-mapped"),
            "{e}"
        );
    }

    #[test]
    fn mtu_mismatch_says_which_and_how() {
        let mut a = roce(1);
        a.required_mtu = 5;
        let b = roce(1); // active 1024
        let e = err(&a, &b);
        assert!(e.contains("path MTU mismatch"), "{e}");
        assert!(e.contains("4096") && e.contains("1024"), "{e}");
        // Both require different values.
        let mut b2 = roce(1);
        b2.required_mtu = 2;
        a.required_mtu = 3;
        let e = err(&a, &b2);
        assert!(
            e.contains("requires MTU 1024 and the peer requires 512"),
            "{e}"
        );
        // A requirement both ports meet is used.
        a.required_mtu = 2;
        assert_eq!(negotiate(&a, &roce(1)).unwrap().path_mtu, 2);
    }

    #[test]
    fn other_settings() {
        let a = roce(1);
        let mut b = roce(1);
        b.recv_buf_size = 4096;
        assert!(err(&a, &b).contains("receive buffer size mismatch"));
        let mut b = roce(1);
        b.min_rnr_timer = 0;
        assert!(err(&a, &b).contains("655 ms"));
        let mut b = roce(1);
        b.retry_cnt = 3;
        assert!(err(&a, &b).contains("retry settings mismatch"));
        let mut b = roce(1);
        b.recv_depth = 1;
        assert!(err(&a, &b).contains("receive depth"));
        let mut b = roce(1);
        b.link_layer = LinkLayer::InfiniBand;
        assert!(err(&a, &b).contains("link layer mismatch"));
        let mut ib = roce(1);
        ib.link_layer = LinkLayer::InfiniBand;
        let mut ib2 = ib.clone();
        ib2.lid = 0;
        assert!(err(&ib, &ib2).contains("subnet manager"));
    }

    #[test]
    fn gid_display_and_mtu_codes() {
        let g = roce(1).gid;
        assert_eq!(
            g.to_string(),
            "0000:0000:0000:0000:0000:ffff:0a4d:0001 (10.77.0.1)"
        );
        assert_eq!(g.ipv4(), Some(Ipv4Addr::new(10, 77, 0, 1)));
        assert_eq!(mtu_bytes(1), 256);
        assert_eq!(mtu_bytes(5), 4096);
        assert_eq!(mtu_bytes(0), 0);
        assert_eq!(mtu_code(1024), Some(3));
        assert_eq!(mtu_code(1000), None);
        assert_eq!(GidType::parse_sysfs("RoCE v2\n"), GidType::RoceV2);
        assert_eq!(GidType::parse_sysfs("IB/RoCE v1"), GidType::IbRoceV1);
    }

    #[test]
    fn imm_layout() {
        assert_eq!(imm::decode(imm::encode(5, false)), (5, false));
        assert_eq!(imm::decode(imm::encode(0, true)), (0, true));
        assert_eq!(imm::decode(imm::encode(1 << 20, false)), (0xffff, false));
    }
}
