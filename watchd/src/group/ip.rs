//! The `ip` resource: a virtual address that follows its group. Online adds it to its interface
//! (through iproute2's `ip`) and announces it (gratuitous ARP for IPv4, an unsolicited neighbour
//! advertisement for IPv6) so neighbours stop sending to the previous owner; offline removes it.
//! It must never touch addresses other than its own, and never fail offline because the address
//! (or its interface) is already gone.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use std::{io, mem};

use serde::Deserialize;
use tokio::process::Command;
use tokio::task::JoinHandle;

use super::resource::{Health, ResourceError, RunError, run_bounded_keeping};

/// The property holding the address in CIDR notation (`10.0.0.5/24`, `fd00::5/64`).
pub const ADDRESS_PROPERTY: &str = "address";
/// The property naming the interface that carries the address.
pub const INTERFACE_PROPERTY: &str = "interface";
/// The iproute2 program.
pub const IP_COMMAND: &str = "ip";
/// How many announcements follow an online: switches and neighbours may miss one.
pub const ANNOUNCEMENTS: u32 = 3;
/// The pause between two announcements.
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_millis(200);
/// Each background attempt to remove an address an offline left behind
/// ([`IpResource::offline`]) may take this long.
const LEFTOVER_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause between two background attempts.
const LEFTOVER_PAUSE: Duration = Duration::from_millis(200);
/// How many background attempts are made before giving up (with an error in the log).
const LEFTOVER_TRIES: u32 = 100;
/// The longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_INTERFACE_NAME: usize = 15;
/// The most of `ip -j addr show dev IF` that is read: some 150 bytes per address, so room
/// for tens of thousands (a host carrying the addresses of many groups).
const IP_OUTPUT_MAX: usize = 4 << 20;
/// The properties an `ip` resource takes.
const PROPERTIES: [&str; 2] = [ADDRESS_PROPERTY, INTERFACE_PROPERTY];
/// ARP's hardware type for Ethernet.
const ARP_HTYPE_ETHERNET: u16 = 1;
/// ARP's protocol type for IPv4 (the EtherType).
const ARP_PTYPE_IPV4: u16 = 0x0800;
const ARP_OP_REQUEST: u16 = 1;
const ARP_OP_REPLY: u16 = 2;
/// ICMPv6 Neighbor Advertisement.
const ICMPV6_NEIGHBOR_ADVERTISEMENT: u8 = 136;
/// The NA's Override flag: replace the cached link-layer address.
const NA_FLAG_OVERRIDE: u8 = 0x20;
/// NDP option: target link-layer address.
const NDP_OPTION_TARGET_LLADDR: u8 = 2;
/// Neighbour discovery packets must arrive with hop limit 255 (RFC 4861 7.1.2).
const NDP_HOP_LIMIT: libc::c_int = 255;
const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// Removals of addresses that an offline could not finish within its bound, per (interface,
/// address): they go on in the background until the address is gone. A forced stop on a host
/// too busy to run `ip` in time must not leave the address behind, answering for a group that
/// another node owns by then. An online of the same address cancels its removal.
static LEFTOVERS: Mutex<BTreeMap<(String, IpAddr), JoinHandle<()>>> = Mutex::new(BTreeMap::new());

fn leftovers() -> std::sync::MutexGuard<'static, BTreeMap<(String, IpAddr), JoinHandle<()>>> {
    // Plain data: consistent whatever a panicking holder did.
    LEFTOVERS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Hands the removal of its resource's address to the background when dropped armed.
struct Unfinished<'a>(Option<&'a IpResource>);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.remove_in_background();
        }
    }
}

/// A validated `ip` resource.
#[derive(Debug)]
pub struct IpResource {
    address: IpAddr,
    prefix: u8,
    interface: String,
    /// The announcements still to come after an online; aborted by offline and on drop.
    announcer: Mutex<Option<JoinHandle<()>>>,
}

impl IpResource {
    /// Validates `address` (CIDR) and `interface` (a Linux interface name); any other property
    /// is refused, so a misspelt one does not go unnoticed.
    pub fn from_properties(
        properties: &BTreeMap<String, String>,
    ) -> Result<IpResource, ResourceError> {
        if let Some(unknown) = properties
            .keys()
            .find(|k| !PROPERTIES.contains(&k.as_str()))
        {
            return Err(bad(
                unknown,
                format!(
                    "unknown property (an ip resource takes {})",
                    PROPERTIES.join(", ")
                ),
            ));
        }
        let address = properties.get(ADDRESS_PROPERTY).ok_or_else(|| {
            bad(
                ADDRESS_PROPERTY,
                "missing (an address in CIDR notation)".into(),
            )
        })?;
        let (address, prefix) = parse_cidr(address).map_err(|why| bad(ADDRESS_PROPERTY, why))?;
        let interface = properties.get(INTERFACE_PROPERTY).ok_or_else(|| {
            bad(
                INTERFACE_PROPERTY,
                "missing (a network interface name)".into(),
            )
        })?;
        check_interface_name(interface).map_err(|why| bad(INTERFACE_PROPERTY, why))?;
        Ok(IpResource {
            address,
            prefix,
            interface: interface.clone(),
            announcer: Mutex::new(None),
        })
    }

    /// The address.
    pub fn address(&self) -> IpAddr {
        self.address
    }

    /// Its prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The interface.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Adds the address unless present, then announces it (once now, [`ANNOUNCEMENTS`] - 1
    /// more times in the background). Each command is bounded by `timeout`.
    pub async fn online(&self, timeout: Duration) -> Result<(), ResourceError> {
        if let Some(removal) = leftovers().remove(&(self.interface.clone(), self.address)) {
            removal.abort();
        }
        let link = self.link(timeout).await?;
        if !link.has(self.address) {
            let mut args = vec![
                "addr".to_owned(),
                "add".to_owned(),
                format!("{}/{}", self.address, self.prefix),
                "dev".to_owned(),
                self.interface.clone(),
            ];
            if self.address.is_ipv6() {
                // A failover address is ours by configuration: duplicate address detection
                // would only keep it unusable (tentative) for a second.
                args.push("nodad".to_owned());
            }
            match ip(&args, timeout).await {
                Ok(_) => {}
                // Added by someone else since the query: present is what online wants.
                Err(ResourceError::CommandFailed { output, .. })
                    if output.contains("File exists") => {}
                Err(e) => return Err(e),
            }
        }
        let Some(announcement) = Announcement::of(self.address, &link) else {
            tracing::debug!(
                address = %self.address,
                interface = %self.interface,
                "no announcement: the interface does not do ARP/NDP over Ethernet"
            );
            return Ok(());
        };
        announcement.send().map_err(|source| ResourceError::Io {
            what: format!("cannot announce {} on {}", self.address, self.interface),
            source,
        })?;
        let follow_ups = tokio::spawn(async move {
            for _ in 1..ANNOUNCEMENTS {
                tokio::time::sleep(ANNOUNCE_INTERVAL).await;
                if let Err(e) = announcement.send() {
                    tracing::debug!(error = %e, "a repeated announcement failed");
                }
            }
        });
        if let Some(previous) = self.announcer().replace(follow_ups) {
            previous.abort();
        }
        Ok(())
    }

    /// Removes the address if present; an absent address or interface is success. A removal
    /// that fails or overruns `timeout` is an error, and goes on in the background until the
    /// address is gone (or an online of it comes).
    pub async fn offline(&self, timeout: Duration) -> Result<(), ResourceError> {
        if let Some(announcer) = self.announcer().take() {
            announcer.abort();
        }
        // Failed, or dropped unfinished (the caller's bound ran out first): the removal goes
        // on in the background.
        let mut unfinished = Unfinished(Some(self));
        let result = self.remove(timeout).await;
        if result.is_ok() {
            unfinished.0 = None;
        }
        result
    }

    /// Keeps trying to remove the address, each attempt within [`LEFTOVER_TIMEOUT`].
    fn remove_in_background(&self) {
        let me = IpResource {
            address: self.address,
            prefix: self.prefix,
            interface: self.interface.clone(),
            announcer: Mutex::new(None),
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(address = %self.address, interface = %self.interface, "an offline left the address, and no runtime is there to remove it");
            return;
        };
        let task = runtime.spawn(async move {
            for attempt in 1..=LEFTOVER_TRIES {
                match me.remove(LEFTOVER_TIMEOUT).await {
                    Ok(()) => {
                        tracing::info!(address = %me.address, interface = %me.interface, attempt, "address left by an offline removed");
                        return;
                    }
                    Err(e) if attempt == LEFTOVER_TRIES => {
                        tracing::error!(address = %me.address, interface = %me.interface, error = %e, "cannot remove the address an offline left; giving up");
                    }
                    Err(_) => tokio::time::sleep(LEFTOVER_PAUSE).await,
                }
            }
        });
        if let Some(previous) = leftovers().insert((self.interface.clone(), self.address), task) {
            previous.abort();
        }
    }

    async fn remove(&self, timeout: Duration) -> Result<(), ResourceError> {
        let link = match self.link(timeout).await {
            Ok(link) => link,
            Err(ResourceError::UnknownInterface(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        for info in link
            .addr_info
            .iter()
            .filter(|a| a.local == Some(self.address))
        {
            let args = [
                "addr".to_owned(),
                "del".to_owned(),
                // The prefix it actually has: `ip addr del` matches on it.
                format!("{}/{}", self.address, info.prefixlen),
                "dev".to_owned(),
                self.interface.clone(),
            ];
            match ip(&args, timeout).await {
                Ok(_) => {}
                // Removed by someone else since the query.
                Err(ResourceError::CommandFailed { output, .. })
                    if output.contains("Cannot assign requested address") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Online when the address is on its interface.
    pub async fn looks_alive(&self, timeout: Duration) -> Result<Health, ResourceError> {
        match self.link(timeout).await {
            Ok(link) if link.has(self.address) => Ok(Health::Online),
            Ok(_) | Err(ResourceError::UnknownInterface(_)) => Ok(Health::Offline),
            Err(e) => Err(e),
        }
    }

    /// Online when the address is on its interface, usable, and the interface is up with a
    /// carrier; failed when present but unusable.
    pub async fn is_alive(&self, timeout: Duration) -> Result<Health, ResourceError> {
        let link = match self.link(timeout).await {
            Ok(link) => link,
            Err(ResourceError::UnknownInterface(_)) => return Ok(Health::Offline),
            Err(e) => return Err(e),
        };
        Ok(link.health(self.address, &self.interface))
    }

    fn announcer(&self) -> std::sync::MutexGuard<'_, Option<JoinHandle<()>>> {
        // The slot holds no invariant a panicking holder could have broken.
        self.announcer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The interface as `ip -j addr show dev IF` describes it.
    async fn link(&self, timeout: Duration) -> Result<Link, ResourceError> {
        let args = [
            "-j".to_owned(),
            "addr".to_owned(),
            "show".to_owned(),
            "dev".to_owned(),
            self.interface.clone(),
        ];
        let stdout = match ip(&args, timeout).await {
            Ok(stdout) => stdout,
            Err(ResourceError::CommandFailed { output, .. })
                if output.contains("does not exist") =>
            {
                return Err(ResourceError::UnknownInterface(self.interface.clone()));
            }
            Err(e) => return Err(e),
        };
        parse_link(&stdout).map_err(|why| ResourceError::BadAnswer {
            command: format!("{IP_COMMAND} {}", args.join(" ")),
            why,
        })
    }
}

impl Drop for IpResource {
    fn drop(&mut self) {
        if let Some(announcer) = self.announcer().take() {
            announcer.abort();
        }
    }
}

fn bad(property: &str, why: String) -> ResourceError {
    ResourceError::BadProperty {
        property: property.to_owned(),
        why,
    }
}

/// `10.0.0.5/24` → (10.0.0.5, 24); the prefix is required.
pub fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let (address, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("`{text}` is not in CIDR notation (ADDRESS/PREFIX)"))?;
    let address: IpAddr = address
        .parse()
        .map_err(|_| format!("`{address}` is not an IPv4 or IPv6 address"))?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    let prefix = prefix
        .parse::<u8>()
        .ok()
        .filter(|p| *p <= max && !prefix.starts_with('+'))
        .ok_or_else(|| format!("`{prefix}` is not a prefix length (0-{max})"))?;
    let unusable = match address {
        IpAddr::V4(a) => {
            a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback()
        }
        IpAddr::V6(a) => a.is_unspecified() || a.is_multicast() || a.is_loopback(),
    };
    if unusable {
        return Err(format!("`{address}` cannot be a host's address"));
    }
    Ok((address, prefix))
}

/// What Linux's `dev_valid_name` accepts.
fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_INTERFACE_NAME {
        return Err(format!(
            "`{name}` is not an interface name (1-{MAX_INTERFACE_NAME} bytes)"
        ));
    }
    if name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "`{}` is not an interface name (no `/`, `:` or blanks)",
            name.escape_debug()
        ));
    }
    Ok(())
}

/// Runs `ip ARGS` bounded by `timeout`; its stdout on success.
async fn ip(args: &[String], timeout: Duration) -> Result<Vec<u8>, ResourceError> {
    let command = || format!("{IP_COMMAND} {}", args.join(" "));
    let done = run_bounded_keeping(Command::new(IP_COMMAND).args(args), timeout, IP_OUTPUT_MAX)
        .await
        .map_err(|e| match e {
            RunError::Spawn(source) => ResourceError::Spawn {
                program: IP_COMMAND.into(),
                source,
            },
            RunError::Wait(source) => ResourceError::Io {
                what: format!("cannot wait for `{}`", command()),
                source,
            },
            RunError::Timeout { output } => ResourceError::CommandFailed {
                command: command(),
                status: crate::machine::ExitStatus::Unknown,
                output: format!(
                    "timed out after {}: {output}",
                    humantime::format_duration(timeout)
                ),
            },
        })?;
    if done.status.is_failure() {
        return Err(ResourceError::CommandFailed {
            command: command(),
            status: done.status,
            output: done.excerpt(),
        });
    }
    if done.stdout_cut {
        return Err(ResourceError::BadAnswer {
            command: command(),
            why: format!("its answer is longer than {IP_OUTPUT_MAX} bytes"),
        });
    }
    Ok(done.stdout)
}

/// The part of `ip -j addr show` this resource reads.
#[derive(Debug, Deserialize)]
struct Link {
    ifindex: u32,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    link_type: String,
    /// The link-layer address (`aa:bb:cc:dd:ee:ff` on Ethernet).
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Debug, Deserialize)]
struct AddrInfo {
    /// Absent for some families; then it is not ours.
    #[serde(default)]
    local: Option<IpAddr>,
    #[serde(default)]
    prefixlen: u8,
    /// `ip` prints IPv6 address states (`tentative`, `dadfailed`) as `"dadfailed": true`.
    #[serde(default)]
    dadfailed: bool,
    #[serde(default)]
    tentative: bool,
}

impl Link {
    fn has(&self, address: IpAddr) -> bool {
        self.addr_info.iter().any(|a| a.local == Some(address))
    }

    fn flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    fn health(&self, address: IpAddr, interface: &str) -> Health {
        let Some(info) = self.addr_info.iter().find(|a| a.local == Some(address)) else {
            return Health::Offline;
        };
        if info.dadfailed {
            Health::Failed(format!(
                "{address} on {interface} failed duplicate address detection (another host has it)"
            ))
        } else if info.tentative {
            Health::Failed(format!("{address} on {interface} is still tentative"))
        } else if !self.flag("UP") {
            Health::Failed(format!("interface {interface} is down"))
        } else if !self.flag("LOWER_UP") {
            Health::Failed(format!("interface {interface} has no carrier"))
        } else {
            Health::Online
        }
    }

    fn mac(&self) -> Option<[u8; 6]> {
        parse_mac(self.address.as_deref()?)
    }
}

fn parse_link(stdout: &[u8]) -> Result<Link, String> {
    let mut links: Vec<Link> = serde_json::from_slice(stdout).map_err(|e| e.to_string())?;
    match links.len() {
        1 => Ok(links.remove(0)),
        n => Err(format!("{n} interfaces instead of one")),
    }
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// One announcement of an address: everything needed to send it again, socket included.
#[derive(Debug)]
struct Announcement {
    ifindex: u32,
    mac: [u8; 6],
    address: IpAddr,
}

impl Announcement {
    /// `None` when the interface is not Ethernet-like (loopback, tun) or does not do ARP.
    fn of(address: IpAddr, link: &Link) -> Option<Announcement> {
        if link.link_type != "ether" || link.flag("NOARP") {
            return None;
        }
        Some(Announcement {
            ifindex: link.ifindex,
            mac: link.mac()?,
            address,
        })
    }

    fn send(&self) -> io::Result<()> {
        match self.address {
            IpAddr::V4(a) => {
                // Both forms: some hosts update their caches from one, some from the other. A
                // request's target hardware address is unknown (zero); a gratuitous reply's
                // must equal the sender's for Linux to take it as gratuitous.
                send_arp(
                    self.ifindex,
                    &arp_packet(ARP_OP_REQUEST, self.mac, a, [0; 6]),
                )?;
                send_arp(
                    self.ifindex,
                    &arp_packet(ARP_OP_REPLY, self.mac, a, self.mac),
                )
            }
            IpAddr::V6(a) => send_neighbor_advertisement(self.ifindex, self.mac, a),
        }
    }
}

/// A gratuitous ARP packet for `address` (sender and target protocol address both `address`).
fn arp_packet(op: u16, mac: [u8; 6], address: Ipv4Addr, target_mac: [u8; 6]) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&ARP_HTYPE_ETHERNET.to_be_bytes());
    p[2..4].copy_from_slice(&ARP_PTYPE_IPV4.to_be_bytes());
    p[4] = 6; // hardware address length
    p[5] = 4; // protocol address length
    p[6..8].copy_from_slice(&op.to_be_bytes());
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&address.octets());
    p[18..24].copy_from_slice(&target_mac);
    p[24..28].copy_from_slice(&address.octets());
    p
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned_socket(
    domain: libc::c_int,
    kind: libc::c_int,
    protocol: libc::c_int,
) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the flags make the descriptor close-on-exec (agents
    // must not inherit it) and non-blocking (a send never stalls the runtime).
    let fd = cvt(unsafe {
        libc::socket(
            domain,
            kind | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            protocol,
        )
    })?;
    // SAFETY: `fd` was just returned by socket(2), is valid, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Broadcasts one ARP packet out of interface `ifindex` through a packet socket (the kernel
/// adds the Ethernet header from the destination address).
fn send_arp(ifindex: u32, packet: &[u8; 28]) -> io::Result<()> {
    let ifindex =
        i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let arp = u16::try_from(libc::ETH_P_ARP)
        .expect("ETH_P_ARP is 0x0806")
        .to_be();
    // Protocol 0: the socket only sends and never queues received frames.
    let socket = owned_socket(libc::AF_PACKET, libc::SOCK_DGRAM, 0)?;
    // SAFETY: sockaddr_ll is plain old data; all zeroes is a valid value of it.
    let mut to: libc::sockaddr_ll = unsafe { mem::zeroed() };
    to.sll_family = u16::try_from(libc::AF_PACKET).expect("AF_PACKET fits in u16");
    to.sll_protocol = arp;
    to.sll_ifindex = ifindex;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&BROADCAST_MAC);
    // SAFETY: `packet` points to 28 readable bytes; `to` is a valid sockaddr_ll that lives for
    // the call and its size is passed with it; the descriptor is open (owned by `socket`).
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const to).cast(),
            socklen_of::<libc::sockaddr_ll>(),
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(mem::size_of::<T>()).expect("a socket address fits in socklen_t")
}

fn set_int_option(
    socket: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and its size is passed with it; the descriptor is open.
    cvt(unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            socklen_of::<libc::c_int>(),
        )
    })
    .map(|_| ())
}

/// Sends an unsolicited neighbour advertisement (Override set) for `address` to all nodes on
/// interface `ifindex`, from `address` itself; the kernel fills in the ICMPv6 checksum.
fn send_neighbor_advertisement(ifindex: u32, mac: [u8; 6], address: Ipv6Addr) -> io::Result<()> {
    let socket = owned_socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6)?;
    set_int_option(
        &socket,
        libc::IPPROTO_IPV6,
        libc::IPV6_MULTICAST_HOPS,
        NDP_HOP_LIMIT,
    )?;
    let index =
        libc::c_int::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    set_int_option(&socket, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_IF, index)?;
    // SAFETY: sockaddr_in6 is plain old data; all zeroes is a valid value of it.
    let mut from: libc::sockaddr_in6 = unsafe { mem::zeroed() };
    from.sin6_family = u16::try_from(libc::AF_INET6).expect("AF_INET6 fits in u16");
    from.sin6_addr.s6_addr = address.octets();
    from.sin6_scope_id = ifindex;
    // SAFETY: `from` is a valid sockaddr_in6 that lives for the call, its size passed with it;
    // the descriptor is open.
    cvt(unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const from).cast(),
            socklen_of::<libc::sockaddr_in6>(),
        )
    })?;
    let mut to = from;
    to.sin6_addr.s6_addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets();
    let mut packet = [0u8; 32];
    packet[0] = ICMPV6_NEIGHBOR_ADVERTISEMENT;
    packet[4] = NA_FLAG_OVERRIDE;
    packet[8..24].copy_from_slice(&address.octets());
    packet[24] = NDP_OPTION_TARGET_LLADDR;
    packet[25] = 1; // option length in units of 8 bytes
    packet[26..32].copy_from_slice(&mac);
    // SAFETY: `packet` points to 32 readable bytes; `to` is a valid sockaddr_in6 that lives for
    // the call, its size passed with it; the descriptor is open.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const to).cast(),
            socklen_of::<libc::sockaddr_in6>(),
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        IpResource::from_properties(&props(pairs))
            .expect_err("invalid")
            .to_string()
    }

    #[test]
    fn valid_properties() {
        let r = IpResource::from_properties(&props(&[
            ("address", "10.1.2.3/24"),
            ("interface", "eth0"),
        ]))
        .expect("valid");
        assert_eq!(r.address(), IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)));
        assert_eq!((r.prefix(), r.interface()), (24, "eth0"));
        let r = IpResource::from_properties(&props(&[
            ("address", "fd00::5/64"),
            ("interface", "bond0.100"),
        ]))
        .expect("valid");
        assert_eq!(r.address(), "fd00::5".parse::<IpAddr>().expect("v6"));
    }

    #[test]
    fn invalid_properties_say_why() {
        assert_eq!(
            err(&[("interface", "eth0")]),
            "property `address`: missing (an address in CIDR notation)"
        );
        assert_eq!(
            err(&[("address", "10.0.0.1/24")]),
            "property `interface`: missing (a network interface name)"
        );
        assert_eq!(
            err(&[("address", "10.0.0.1"), ("interface", "eth0")]),
            "property `address`: `10.0.0.1` is not in CIDR notation (ADDRESS/PREFIX)"
        );
        assert_eq!(
            err(&[("address", "10.0.0.256/24"), ("interface", "eth0")]),
            "property `address`: `10.0.0.256` is not an IPv4 or IPv6 address"
        );
        assert_eq!(
            err(&[("address", "10.0.0.1/33"), ("interface", "eth0")]),
            "property `address`: `33` is not a prefix length (0-32)"
        );
        assert_eq!(
            err(&[("address", "fd00::1/129"), ("interface", "eth0")]),
            "property `address`: `129` is not a prefix length (0-128)"
        );
        for bad in ["10.0.0.1/", "10.0.0.1/+8", "10.0.0.1/x", "/24", "a/b/c"] {
            assert!(
                IpResource::from_properties(&props(&[("address", bad), ("interface", "eth0")]))
                    .is_err(),
                "{bad}"
            );
        }
        assert_eq!(
            err(&[("address", "224.0.0.1/24"), ("interface", "eth0")]),
            "property `address`: `224.0.0.1` cannot be a host's address"
        );
        assert_eq!(
            err(&[
                ("address", "10.0.0.1/24"),
                ("interface", "averyveryverylongname")
            ]),
            "property `interface`: `averyveryverylongname` is not an interface name (1-15 bytes)"
        );
        for bad in ["", "a/b", "eth0:1", "a b", "..", "a\nb"] {
            assert!(
                err(&[("address", "10.0.0.1/24"), ("interface", bad)])
                    .starts_with("property `interface`:"),
                "{bad:?}"
            );
        }
        assert_eq!(
            err(&[
                ("address", "10.0.0.1/24"),
                ("interface", "eth0"),
                ("netmask", "24")
            ]),
            "property `netmask`: unknown property (an ip resource takes address, interface)"
        );
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(
            parse_mac("02:ab:CD:00:01:ff"),
            Some([0x02, 0xab, 0xcd, 0x00, 0x01, 0xff])
        );
        for bad in [
            "",
            "02:ab:cd:00:01",
            "02:ab:cd:00:01:ff:00",
            "2:ab:cd:00:01:ff",
            "zz:ab:cd:00:01:ff",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn gratuitous_arp_layout() {
        let mac = [2, 0, 0, 0, 0, 9];
        let p = arp_packet(ARP_OP_REPLY, mac, Ipv4Addr::new(10, 0, 0, 5), mac);
        assert_eq!(
            p,
            [
                0, 1, 8, 0, 6, 4, 0, 2, 2, 0, 0, 0, 0, 9, 10, 0, 0, 5, 2, 0, 0, 0, 0, 9, 10, 0, 0,
                5
            ]
        );
    }

    #[test]
    fn ip_json_is_read_and_judged() {
        let json =
            br#"[{"ifindex":7,"ifname":"eth0","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],
            "link_type":"ether","address":"02:00:00:00:00:09",
            "addr_info":[{"family":"inet","local":"10.0.0.2","prefixlen":24},
                         {"family":"inet6","local":"fd00::5","prefixlen":64,"dadfailed":true}]}]"#;
        let link = parse_link(json).expect("parses");
        let v4: IpAddr = "10.0.0.2".parse().expect("v4");
        let v6: IpAddr = "fd00::5".parse().expect("v6");
        assert!(link.has(v4) && link.has(v6));
        assert_eq!(link.health(v4, "eth0"), Health::Online);
        assert!(matches!(link.health(v6, "eth0"), Health::Failed(w) if w.contains("duplicate")));
        assert_eq!(
            link.health("10.0.0.3".parse().expect("v4"), "eth0"),
            Health::Offline
        );
        let announcement = Announcement::of(v4, &link).expect("ethernet");
        assert_eq!(
            (announcement.ifindex, announcement.mac),
            (7, [2, 0, 0, 0, 0, 9])
        );

        let down = br#"[{"ifindex":7,"flags":["BROADCAST","UP"],"link_type":"ether",
            "address":"02:00:00:00:00:09","addr_info":[{"local":"10.0.0.2","prefixlen":24}]}]"#;
        assert_eq!(
            parse_link(down).expect("parses").health(v4, "eth0"),
            Health::Failed("interface eth0 has no carrier".into())
        );
        let lo = br#"[{"ifindex":1,"flags":["LOOPBACK","UP","LOWER_UP"],"link_type":"loopback",
            "address":"00:00:00:00:00:00","addr_info":[]}]"#;
        assert!(Announcement::of(v4, &parse_link(lo).expect("parses")).is_none());
        assert!(parse_link(b"[]").is_err());
        assert!(parse_link(b"garbage").is_err());
    }
}
