//! The rtnetlink side of SR-IOV: a PF's per-VF admin settings (MAC, VLAN,
//! spoof check, trust, link state), plus link up and MAC on any netdev.
//!
//! Messages are built and parsed by `netlink-packet-route`; this module only
//! sends them over a synchronous `netlink-sys` socket and matches replies.

use std::io;
use std::os::fd::AsRawFd;

use netlink_packet_core::{
    Emitable, ErrorBuffer, ErrorMessage, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, Nla, NlasIterator, Parseable, ParseableParametrized, NLMSG_DONE, NLMSG_ERROR,
    NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_REQUEST,
};
use netlink_packet_route::link::{
    LinkAttribute, LinkExtentMask, LinkFlags, LinkHeader, LinkMessage, LinkVfInfo, VfInfo,
    VfInfoLinkState, VfInfoMac, VfInfoSpoofCheck, VfInfoTrust, VfInfoVlan, VfLinkState,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::{Error, LinkState, Result, VfConfig, VfSettings};

/// `nlmsgerr` TLV carrying the kernel's extended-ack text.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// Size of `struct nlmsghdr`, echoed at the start of a capped error.
const NLMSGHDR_LEN: usize = 16;

/// An rtnetlink socket (one request at a time).
pub struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> Result<Rtnl> {
        let nl_err = |e| Error::netlink("opening an rtnetlink socket", e, None);
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(nl_err)?;
        sock.bind_auto().map_err(nl_err)?;
        // Best effort: the kernel's reason text in error acks, without an
        // echo of the request (older kernels lack these options).
        let _ = sock.set_ext_ack(true);
        let _ = sock.set_cap_ack(true);
        // The kernel always answers rtnetlink requests; a timeout only
        // guards against waiting forever on something unforeseen.
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: valid socket fd and a timeval of the size passed.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(nl_err(io::Error::last_os_error()));
        }
        Ok(Rtnl { sock, seq: 0 })
    }

    /// Sends `msg` as a request (with an ack asked for when `ack`); returns
    /// its sequence number.
    fn send(&mut self, msg: RouteNetlinkMessage, ack: bool, what: &str) -> Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | if ack { NLM_F_ACK } else { 0 };
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        let kernel = SocketAddr::new(0, 0);
        self.sock
            .send_to(&buf, &kernel, 0)
            .map_err(|e| Error::netlink(what, e, None))?;
        Ok(self.seq)
    }

    /// One whole datagram, however large (a PF with many VFs answers with
    /// a big message).
    fn recv_datagram(&self, what: &str) -> Result<Vec<u8>> {
        let err = |e| Error::netlink(what, e, None);
        let mut peek: Vec<u8> = Vec::with_capacity(64);
        let len = self
            .sock
            .recv(&mut peek, libc::MSG_PEEK | libc::MSG_TRUNC)
            .map_err(err)?;
        let mut buf: Vec<u8> = Vec::with_capacity(len.max(64));
        self.sock.recv(&mut buf, 0).map_err(err)?;
        Ok(buf)
    }

    /// Waits for the reply to request `seq`: the first message that is
    /// neither an ack nor an error, as (type, payload), or None for the
    /// ack. A negative ack becomes the kernel's errno.
    fn reply(&self, seq: u32, what: &str) -> Result<Option<(u16, Vec<u8>)>> {
        let bad = |e: netlink_packet_core::DecodeError| {
            Error::netlink(what, io::Error::other(e.to_string()), None)
        };
        loop {
            let buf = self.recv_datagram(what)?;
            let mut off = 0;
            while let Some(rest) = buf.get(off..).filter(|r| !r.is_empty()) {
                // Checked: 16 <= length <= what is left.
                let nb = NetlinkBuffer::new_checked(rest).map_err(bad)?;
                off += (nb.length() as usize).div_ceil(4) * 4;
                if nb.sequence_number() != seq {
                    continue; // a late answer to an earlier request
                }
                match nb.message_type() {
                    NLMSG_ERROR => {
                        let payload = nb.payload();
                        let e = ErrorBuffer::new_checked(&payload)
                            .and_then(|b| ErrorMessage::parse(&b))
                            .map_err(bad)?;
                        if e.code.is_none() {
                            return Ok(None);
                        }
                        let extack = if nb.flags() & NLM_F_ACK_TLVS != 0 {
                            extack_message(&e.header)
                        } else {
                            None
                        };
                        return Err(Error::netlink(what, e.to_io(), extack));
                    }
                    NLMSG_DONE => return Ok(None),
                    t if t < 16 => {} // other control messages (NOOP, OVERRUN)
                    t => return Ok(Some((t, nb.payload().to_vec()))),
                }
            }
        }
    }

    /// The `RTM_NEWLINK` answer for interface `ifindex` (with VF info):
    /// its attributes, each parsed on its own so that one this crate
    /// version cannot parse does not hide the others.
    fn get_link(&mut self, ifindex: u32, what: &str) -> Result<Vec<(u16, Result<LinkAttribute>)>> {
        let mut m = LinkMessage::default();
        m.header.index = ifindex;
        m.attributes.push(LinkAttribute::ExtMask(vec![
            LinkExtentMask::Vf,
            LinkExtentMask::SkipStats,
        ]));
        let seq = self.send(RouteNetlinkMessage::GetLink(m), false, what)?;
        let bad = |m: String| Error::netlink(what, io::Error::other(m), None);
        let payload = match self.reply(seq, what)? {
            Some((t, p)) if t == libc::RTM_NEWLINK => p,
            _ => return Err(bad("no RTM_NEWLINK in the kernel's answer".into())),
        };
        let header = LinkHeader::default().buffer_len();
        let attrs = payload
            .get(header..)
            .ok_or_else(|| bad("short RTM_NEWLINK".into()))?;
        let mut out = Vec::new();
        for nla in NlasIterator::new(attrs) {
            let nla = nla.map_err(|e| bad(e.to_string()))?;
            let parsed = LinkAttribute::parse_with_param(&nla, AddressFamily::Unspec)
                .map_err(|e| bad(e.to_string()));
            out.push((nla.kind(), parsed));
        }
        Ok(out)
    }

    /// `RTM_SETLINK` on `ifindex`, waiting for the kernel's ack.
    fn set_link(&mut self, m: LinkMessage, what: &str) -> Result<()> {
        let seq = self.send(RouteNetlinkMessage::SetLink(m), true, what)?;
        // The kernel answers a SETLINK with an ack only.
        self.reply(seq, what).map(|_| ())
    }

    /// The admin settings of every VF the PF driver reports, by VF index.
    /// Empty for a netdev that is not a PF.
    pub fn vf_configs(&mut self, pf: &str) -> Result<Vec<VfConfig>> {
        let what = format!("reading VF settings of {pf}");
        let ifindex = ifindex(pf)?;
        let vf_list = LinkAttribute::VfInfoList(Vec::new()).kind();
        let mut out = Vec::new();
        for (kind, attr) in self.get_link(ifindex, &what)? {
            match attr {
                Ok(LinkAttribute::VfInfoList(list)) => {
                    out.extend(list.iter().filter_map(vf_config))
                }
                // The one attribute wanted here must parse.
                Err(e) if kind == vf_list => return Err(e),
                _ => {}
            }
        }
        out.sort_by_key(|c| c.index);
        Ok(out)
    }

    /// Applies `s` to VF `index` of `pf`, one `RTM_SETLINK` per setting:
    /// the kernel stops at the first setting the PF driver refuses (igb
    /// has no link state), and the error must say which one that was.
    /// Settings before it stay applied.
    pub fn set_vf(&mut self, pf: &str, index: u32, s: &VfSettings) -> Result<()> {
        let ifindex = ifindex(pf)?;
        for (name, attr) in vf_info(index, s) {
            let mut m = LinkMessage::default();
            m.header.index = ifindex;
            m.attributes
                .push(LinkAttribute::VfInfoList(vec![LinkVfInfo(vec![attr])]));
            self.set_link(m, &format!("setting the {name} of VF {index} of {pf}"))?;
        }
        Ok(())
    }

    /// Sets netdev `name` administratively up.
    pub fn set_up(&mut self, name: &str) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = ifindex(name)?;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        self.set_link(m, &format!("setting {name} up"))
    }

    /// Sets the MAC address of netdev `name`.
    pub fn set_mac(&mut self, name: &str, mac: [u8; 6]) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = ifindex(name)?;
        m.attributes.push(LinkAttribute::Address(mac.to_vec()));
        self.set_link(m, &format!("setting the MAC address of {name}"))
    }
}

fn ifindex(name: &str) -> Result<u32> {
    if_index(name).ok_or_else(|| Error::NoSuchNetdev(name.to_string()))
}

/// Index of the network interface `name` in this namespace, if it exists
/// (the backends look netdevs up with it too).
pub fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: c is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => None,
        i => Some(i),
    }
}

/// The text of `NLMSGERR_ATTR_MSG` in a capped error payload (the echoed
/// request header followed by TLVs).
fn extack_message(payload: &[u8]) -> Option<String> {
    let tlvs = payload.get(NLMSGHDR_LEN..)?;
    NlasIterator::new(tlvs)
        .filter_map(|n| n.ok())
        .find(|n| n.kind() == NLMSGERR_ATTR_MSG)
        .map(|n| {
            let v = n.value();
            let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
            String::from_utf8_lossy(&v[..end]).into_owned()
        })
        .filter(|s| !s.is_empty())
}

/// One IFLA_VF_INFO as the kernel reported it; None if it names no VF.
fn vf_config(info: &LinkVfInfo) -> Option<VfConfig> {
    let mut c = VfConfig::default();
    let mut index = None;
    for a in &info.0 {
        match a {
            VfInfo::Mac(m) => {
                index = Some(m.vf_id);
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&m.mac[..6]);
                c.mac = Some(mac);
            }
            VfInfo::Vlan(v) => {
                index = Some(v.vf_id);
                c.vlan = Some(v.vlan_id);
                c.qos = Some(v.qos);
            }
            VfInfo::SpoofCheck(s) => c.spoofchk = Some(s.enabled),
            VfInfo::Trust(t) => c.trust = Some(t.enabled),
            VfInfo::LinkState(l) => {
                c.link_state = Some(match l.state {
                    VfLinkState::Auto => LinkState::Auto,
                    VfLinkState::Enable => LinkState::Enable,
                    VfLinkState::Disable => LinkState::Disable,
                    VfLinkState::Other(n) => LinkState::Other(n),
                    _ => LinkState::Other(u32::MAX),
                })
            }
            _ => {}
        }
    }
    c.index = index?;
    Some(c)
}

/// The IFLA_VF_INFO attributes that apply `s` to VF `index`, each with
/// the name of the setting (for errors), in the kernel's order.
fn vf_info(index: u32, s: &VfSettings) -> Vec<(&'static str, VfInfo)> {
    let mut v = Vec::new();
    if let Some(mac) = s.mac {
        v.push(("MAC address", VfInfo::Mac(VfInfoMac::new(index, &mac))));
    }
    if let Some((vlan, qos)) = s.vlan {
        let vlan = VfInfoVlan::new(index, vlan.into(), qos.into());
        v.push(("VLAN", VfInfo::Vlan(vlan)));
    }
    if let Some(on) = s.spoofchk {
        let spoofchk = VfInfoSpoofCheck::new(index, on);
        v.push(("spoof check", VfInfo::SpoofCheck(spoofchk)));
    }
    if let Some(l) = s.link_state {
        let state = match l {
            LinkState::Auto => VfLinkState::Auto,
            LinkState::Enable => VfLinkState::Enable,
            LinkState::Disable => VfLinkState::Disable,
            LinkState::Other(n) => VfLinkState::Other(n),
        };
        let state = VfInfoLinkState::new(index, state);
        v.push(("link state", VfInfo::LinkState(state)));
    }
    if let Some(on) = s.trust {
        v.push(("trust", VfInfo::Trust(VfInfoTrust::new(index, on))));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_through_the_crate() {
        let s = VfSettings {
            mac: Some([0x52, 0x54, 0, 0x6d, 0x90, 2]),
            vlan: Some((42, 3)),
            spoofchk: Some(false),
            trust: Some(true),
            link_state: Some(LinkState::Disable),
        };
        let attrs = vf_info(5, &s);
        let names: Vec<&str> = attrs.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            ["MAC address", "VLAN", "spoof check", "link state", "trust"]
        );
        let info = LinkVfInfo(attrs.into_iter().map(|(_, a)| a).collect());
        // Emit and parse again as the kernel's answer would be parsed.
        let attr = LinkAttribute::VfInfoList(vec![info]);
        let mut m = LinkMessage::default();
        m.attributes.push(attr);
        let mut buf = vec![0u8; m.buffer_len()];
        m.emit(&mut buf);
        let back = LinkMessage::parse(&buf[..]).unwrap();
        let LinkAttribute::VfInfoList(list) = &back.attributes[0] else {
            panic!("no VF list")
        };
        let c = vf_config(&list[0]).unwrap();
        assert_eq!(
            c,
            VfConfig {
                index: 5,
                mac: Some([0x52, 0x54, 0, 0x6d, 0x90, 2]),
                vlan: Some(42),
                qos: Some(3),
                spoofchk: Some(false),
                trust: Some(true),
                link_state: Some(LinkState::Disable),
            }
        );
        assert!(vf_info(0, &VfSettings::default()).is_empty());
        // Without MAC or VLAN nothing says which VF it is.
        assert_eq!(vf_config(&LinkVfInfo(vec![])), None);
    }

    #[test]
    fn extack_text_is_found() {
        let mut payload = vec![0u8; NLMSGHDR_LEN];
        // TLV: len 4 + "bad vf\0" (7) = 11, padded to 12; kind 1.
        payload.extend_from_slice(&11u16.to_ne_bytes());
        payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend_from_slice(b"bad vf\0\0");
        assert_eq!(extack_message(&payload).as_deref(), Some("bad vf"));
        assert_eq!(extack_message(&payload[..NLMSGHDR_LEN]), None);
        assert_eq!(extack_message(&[1, 2, 3]), None);
        // A truncated TLV is ignored, not trusted.
        assert_eq!(extack_message(&payload[..NLMSGHDR_LEN + 6]), None);
    }
}
