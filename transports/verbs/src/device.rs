//! RDMA devices: listing them (for `agentfabric info`), opening one, and choosing a port and GID.

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use rdma_sys::*;

use crate::params::{mtu_bytes, Gid, GidType, LinkLayer};
use crate::window::Binder;

/// One GID table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidInfo {
    /// Index in the port's table.
    pub index: u8,
    /// The GID.
    pub gid: Gid,
    /// Its type (RoCE v1/v2), from sysfs.
    pub gid_type: GidType,
    /// The network device it belongs to (RoCE), from sysfs.
    pub netdev: Option<String>,
}

/// One port of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// Port number (from 1).
    pub port: u8,
    /// State as text ("ACTIVE", "DOWN", ...).
    pub state: &'static str,
    /// Whether the port is ACTIVE.
    pub active: bool,
    /// Active MTU in bytes.
    pub active_mtu: u32,
    /// Largest MTU in bytes.
    pub max_mtu: u32,
    /// Link layer.
    pub link_layer: LinkLayer,
    /// LID (InfiniBand).
    pub lid: u16,
    /// The populated GID entries.
    pub gids: Vec<GidInfo>,
}

/// One RDMA device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Name (e.g. `rxe0`, `mlx5_0`).
    pub name: String,
    /// Largest inline data a QP may request, if the device says (0 if unknown).
    pub max_qp_wr: u32,
    /// Its ports.
    pub ports: Vec<PortInfo>,
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} (max_qp_wr {})", self.name, self.max_qp_wr)?;
        for p in &self.ports {
            writeln!(
                f,
                "  port {}: {} link {} active_mtu {} max_mtu {} lid {}",
                p.port, p.state, p.link_layer, p.active_mtu, p.max_mtu, p.lid
            )?;
            for g in &p.gids {
                writeln!(
                    f,
                    "    gid[{}] {} {}{}",
                    g.index,
                    g.gid,
                    g.gid_type,
                    g.netdev
                        .as_deref()
                        .map(|n| format!(" netdev {n}"))
                        .unwrap_or_default()
                )?;
            }
        }
        Ok(())
    }
}

fn port_state(s: u32) -> &'static str {
    match s {
        ibv_port_state::IBV_PORT_DOWN => "DOWN",
        ibv_port_state::IBV_PORT_INIT => "INIT",
        ibv_port_state::IBV_PORT_ARMED => "ARMED",
        ibv_port_state::IBV_PORT_ACTIVE => "ACTIVE",
        ibv_port_state::IBV_PORT_ACTIVE_DEFER => "ACTIVE_DEFER",
        _ => "NOP",
    }
}

/// The text to add to "no RDMA device" errors.
pub(crate) const NO_DEVICE_HINT: &str = "this machine has no usable RDMA device; run in the \
     Soft-RoCE lab (soft-roce/lab run -- CMD, or soft-roce/lab test)";

/// Lists the RDMA devices, their ports (state, MTU, link layer) and populated GIDs with their
/// types, as `agentfabric info` shows them. An error if the kernel has no RDMA support
/// (`ENOSYS`); an empty list if it has but there are no devices.
pub fn devices() -> io::Result<Vec<DeviceInfo>> {
    let list = DeviceList::get()?;
    let mut out = Vec::new();
    for i in 0..list.len() {
        let name = list.name(i);
        let ctx = match Context::open_at(&list, i) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(device = %name, error = %e, "cannot open RDMA device");
                continue;
            }
        };
        out.push(ctx.info()?);
    }
    Ok(out)
}

struct DeviceList {
    ptr: *mut *mut ibv_device,
    n: usize,
}

impl DeviceList {
    fn get() -> io::Result<DeviceList> {
        let mut n = 0;
        // SAFETY: plain FFI call; the list is freed in Drop.
        let ptr = unsafe { ibv_get_device_list(&mut n) };
        if ptr.is_null() {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("cannot list RDMA devices: {e} ({NO_DEVICE_HINT})"),
            ));
        }
        Ok(DeviceList {
            ptr,
            n: n.max(0) as usize,
        })
    }
    fn len(&self) -> usize {
        self.n
    }
    fn dev(&self, i: usize) -> *mut ibv_device {
        assert!(i < self.n);
        // SAFETY: i < n, the list holds n valid pointers.
        unsafe { *self.ptr.add(i) }
    }
    fn name(&self, i: usize) -> String {
        // SAFETY: ibv_get_device_name returns a NUL-terminated string owned by the device.
        unsafe { CStr::from_ptr(ibv_get_device_name(self.dev(i))) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: ptr came from ibv_get_device_list; opened contexts stay valid after this.
        unsafe { ibv_free_device_list(self.ptr) }
    }
}

/// Vendor ids of the software RDMA devices: Soft-RoCE (`RXE_VENDOR_ID` in the kernel's
/// `rxe_param.h`; `ibv_devinfo` shows 0xffffff on rxe0) and soft-iWARP (`SIW_VENDOR_ID`, "bmt").
const SOFTWARE_VENDOR_IDS: [u32; 2] = [0x00ff_ffff, 0x0062_6d74];

/// An open device with one protection domain. Shared (`Arc`) by every connection on it; closed
/// when the last connection's resources are gone (they hold an `Arc`).
pub(crate) struct Context {
    pub(crate) ctx: *mut ibv_context,
    pub(crate) pd: *mut ibv_pd,
    pub(crate) name: String,
    pub(crate) max_qp_wr: u32,
    /// RDMA READs a QP of this device accepts in flight as the target (`max_qp_rd_atom`), and
    /// issues in flight as the initiator (`max_qp_init_rd_atom`), capped at
    /// [`crate::config::READ_DEPTH`]; at least 1.
    pub(crate) reads_in: u8,
    pub(crate) reads_out: u8,
    /// A software device (Soft-RoCE `rxe`, `siw`), by its vendor id: its `ibv_post_send` runs
    /// the protocol, copies included, inside the posting system call (see
    /// [`crate::config::Posting::Auto`]).
    pub(crate) software: bool,
    /// The device has type 1 memory windows (`IBV_DEVICE_MEM_WINDOW`).
    mem_windows: bool,
    /// Binds memory windows ([`Context::binder`]); made at the first use, `None` when it cannot
    /// be (no windows, no ACTIVE port).
    binder: OnceLock<Option<Binder>>,
}

// SAFETY: ibv_context and ibv_pd are thread-safe handles in rdma-core.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // The binder's QP and CQ go before the PD and context they were made on.
        drop(self.binder.take());
        // SAFETY: every other QP, CQ, MR and window made from this PD/context holds an
        // Arc<Context>, so none is left when this runs.
        unsafe {
            ibv_dealloc_pd(self.pd);
            ibv_close_device(self.ctx);
        }
    }
}

/// A device this end uses, with the port and GID index its QPs use: a connection's own, or a
/// rail's.
pub(crate) struct LocalPort {
    pub(crate) dev: Arc<Context>,
    pub(crate) port: u8,
    pub(crate) gid_index: u8,
}

impl Context {
    /// Opens the device called `name`; `setting` names where the name came from, for the error
    /// when there is no such device.
    pub(crate) fn open(name: &str, setting: &str) -> io::Result<Arc<Context>> {
        let list = DeviceList::get()?;
        let names: Vec<String> = (0..list.len()).map(|i| list.name(i)).collect();
        if names.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no RDMA devices found: {NO_DEVICE_HINT}"),
            ));
        }
        let Some(i) = names.iter().position(|n| n == name) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "RDMA device {name:?} not found (devices here: {}): set {setting} to one of \
                     them",
                    names.join(", ")
                ),
            ));
        };
        Context::open_at(&list, i).map(Arc::new)
    }

    /// Names of the devices present.
    pub(crate) fn names() -> io::Result<Vec<String>> {
        let list = DeviceList::get()?;
        Ok((0..list.len()).map(|i| list.name(i)).collect())
    }

    fn open_at(list: &DeviceList, i: usize) -> io::Result<Context> {
        let name = list.name(i);
        // SAFETY: a device pointer from the live list.
        let ctx = unsafe { ibv_open_device(list.dev(i)) };
        if ctx.is_null() {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("cannot open RDMA device {name}: {e}"),
            ));
        }
        // SAFETY: ctx is open.
        let pd = unsafe { ibv_alloc_pd(ctx) };
        if pd.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: ctx is open and has nothing on it.
            unsafe { ibv_close_device(ctx) };
            return Err(io::Error::new(
                e.kind(),
                format!("cannot allocate a protection domain on {name}: {e}"),
            ));
        }
        // SAFETY: zeroed is a valid ibv_device_attr; ctx is open.
        let mut attr: ibv_device_attr = unsafe { std::mem::zeroed() };
        let queried = unsafe { ibv_query_device(ctx, &mut attr) } == 0;
        let max_qp_wr = if queried {
            attr.max_qp_wr.max(0) as u32
        } else {
            0
        };
        let reads = |n: i32| {
            if queried {
                n.clamp(1, i32::from(crate::config::READ_DEPTH)) as u8
            } else {
                1
            }
        };
        Ok(Context {
            ctx,
            pd,
            name,
            max_qp_wr,
            reads_in: reads(attr.max_qp_rd_atom),
            reads_out: reads(attr.max_qp_init_rd_atom),
            software: queried && SOFTWARE_VENDOR_IDS.contains(&attr.vendor_id),
            mem_windows: queried
                && attr.device_cap_flags & ibv_device_cap_flags::IBV_DEVICE_MEM_WINDOW.0 != 0,
            binder: OnceLock::new(),
        })
    }

    /// What binds memory windows on this device, made at the first call; `None` when the device
    /// has none or the binder cannot be set up (said once in the log).
    pub(crate) fn binder(&self) -> Option<&Binder> {
        self.binder
            .get_or_init(|| {
                if !self.mem_windows {
                    tracing::debug!(device = %self.name, "the device has no memory windows");
                    return None;
                }
                // The first ACTIVE port and its first RoCE v2 IPv4-mapped GID.
                let made = self.first_active_port().and_then(|port| {
                    let gid_index = self.pick_gid(port, None)?;
                    let gid = self.query_gid(port, gid_index)?;
                    let attr = self.query_port(port)?;
                    // SAFETY: the context and PD are open while `self` lives, and the binder
                    // goes before them (see `Drop`).
                    unsafe {
                        Binder::new(self.ctx, self.pd, &self.name, port, gid_index, gid, &attr)
                    }
                });
                made.map_err(|e| {
                    tracing::info!(
                        device = %self.name,
                        error = %e,
                        "cannot bind memory windows: revoked regions are deregistered"
                    )
                })
                .ok()
            })
            .as_ref()
    }

    fn phys_port_cnt(&self) -> u8 {
        // SAFETY: zeroed is a valid ibv_device_attr; ctx is open.
        let mut attr: ibv_device_attr = unsafe { std::mem::zeroed() };
        if unsafe { ibv_query_device(self.ctx, &mut attr) } != 0 {
            return 1;
        }
        attr.phys_port_cnt
    }

    pub(crate) fn query_port(&self, port: u8) -> io::Result<ibv_port_attr> {
        // SAFETY: zeroed is a valid ibv_port_attr; ctx is open.
        let mut attr: ibv_port_attr = unsafe { std::mem::zeroed() };
        let rc = unsafe { ___ibv_query_port(self.ctx, port, &mut attr) };
        if rc != 0 {
            let e = io::Error::from_raw_os_error(if rc > 0 { rc } else { libc::EINVAL });
            return Err(io::Error::new(
                e.kind(),
                format!("cannot query {} port {port}: {e}", self.name),
            ));
        }
        Ok(attr)
    }

    pub(crate) fn query_gid(&self, port: u8, index: u8) -> io::Result<Gid> {
        let len = self.query_port(port)?.gid_tbl_len;
        if i32::from(index) >= len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "wrong GID index: {} port {port} has {len} GID entries, index {index} is past                      them (see `agentfabric info`); set AGENTFABRIC_LAB_GID_INDEX /                      VerbsConfig::gid_index",
                    self.name
                ),
            ));
        }
        // SAFETY: ibv_gid is plain bytes; ctx is open.
        let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
        let rc = unsafe { ibv_query_gid(self.ctx, port, i32::from(index), &mut gid) };
        if rc != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "wrong GID index: {} port {port} has no GID index {index} (see \
                     `agentfabric info`); set AGENTFABRIC_LAB_GID_INDEX / VerbsConfig::gid_index",
                    self.name
                ),
            ));
        }
        // SAFETY: raw is the whole union.
        Ok(Gid(unsafe { gid.raw }))
    }

    pub(crate) fn gid_type(&self, port: u8, index: u8) -> GidType {
        std::fs::read_to_string(format!(
            "/sys/class/infiniband/{}/ports/{port}/gid_attrs/types/{index}",
            self.name
        ))
        .map(|s| GidType::parse_sysfs(&s))
        .unwrap_or(GidType::Unknown)
    }

    fn gid_netdev(&self, port: u8, index: u8) -> Option<String> {
        std::fs::read_to_string(format!(
            "/sys/class/infiniband/{}/ports/{port}/gid_attrs/ndevs/{index}",
            self.name
        ))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
    }

    pub(crate) fn gids(&self, port: u8, attr: &ibv_port_attr) -> Vec<GidInfo> {
        let n = attr.gid_tbl_len.clamp(0, 256) as usize;
        (0..n)
            .filter_map(|i| {
                let index = i as u8;
                let gid = self.query_gid(port, index).ok()?;
                (!gid.is_zero()).then(|| GidInfo {
                    index,
                    gid,
                    gid_type: self.gid_type(port, index),
                    netdev: self.gid_netdev(port, index),
                })
            })
            .collect()
    }

    fn info(&self) -> io::Result<DeviceInfo> {
        let mut ports = Vec::new();
        for port in 1..=self.phys_port_cnt() {
            let attr = self.query_port(port)?;
            ports.push(PortInfo {
                port,
                state: port_state(attr.state),
                active: attr.state == ibv_port_state::IBV_PORT_ACTIVE,
                active_mtu: mtu_bytes(attr.active_mtu as u8),
                max_mtu: mtu_bytes(attr.max_mtu as u8),
                link_layer: LinkLayer::from_u8(attr.link_layer),
                lid: attr.lid,
                gids: self.gids(port, &attr),
            });
        }
        Ok(DeviceInfo {
            name: self.name.clone(),
            max_qp_wr: self.max_qp_wr,
            ports,
        })
    }

    /// The first ACTIVE port.
    pub(crate) fn first_active_port(&self) -> io::Result<u8> {
        let mut states = Vec::new();
        for port in 1..=self.phys_port_cnt() {
            let attr = self.query_port(port)?;
            if attr.state == ibv_port_state::IBV_PORT_ACTIVE {
                return Ok(port);
            }
            states.push(format!("port {port} {}", port_state(attr.state)));
        }
        Err(io::Error::new(
            io::ErrorKind::NotConnected,
            format!(
                "RDMA device {} has no ACTIVE port ({}): is its network link up?",
                self.name,
                states.join(", ")
            ),
        ))
    }

    /// The GID index to use on `port`: the RoCE v2 IPv4-mapped GID of `ip` if given and present,
    /// else the first RoCE v2 IPv4-mapped GID, else the first IPv4-mapped, else index 0.
    pub(crate) fn pick_gid(&self, port: u8, ip: Option<IpAddr>) -> io::Result<u8> {
        let attr = self.query_port(port)?;
        if LinkLayer::from_u8(attr.link_layer) != LinkLayer::Ethernet {
            return Ok(0);
        }
        let gids = self.gids(port, &attr);
        let v2v4 = |g: &&GidInfo| g.gid_type == GidType::RoceV2 && g.gid.ipv4().is_some();
        if let Some(IpAddr::V4(ip)) = ip {
            if let Some(g) = gids.iter().filter(v2v4).find(|g| g.gid.ipv4() == Some(ip)) {
                return Ok(g.index);
            }
        }
        if let Some(g) = gids.iter().find(v2v4) {
            return Ok(g.index);
        }
        if let Some(g) = gids.iter().find(|g| g.gid.ipv4().is_some()) {
            return Ok(g.index);
        }
        gids.first().map(|g| g.index).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} port {port} has no GID at all: give its netdev an IP address",
                    self.name
                ),
            )
        })
    }

    /// The device (and port, GID index) whose RoCE v2 GID is `ip`, if any.
    pub(crate) fn find_by_ip(ip: IpAddr) -> Option<(String, u8, u8)> {
        let IpAddr::V4(v4) = ip else { return None };
        for d in devices().ok()? {
            for p in d.ports.iter().filter(|p| p.active) {
                for g in &p.gids {
                    if g.gid.ipv4() == Some(v4) && g.gid_type != GidType::IbRoceV1 {
                        return Some((d.name.clone(), p.port, g.index));
                    }
                }
            }
        }
        None
    }
}
