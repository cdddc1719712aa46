//! The rtnetlink side of SR-IOV: a PF's per-VF admin settings (MAC, VLAN,
//! spoof check, trust, link state), plus link up and MAC on any netdev.
//!
//! Messages are built and parsed by `netlink-packet-route`; this module only
//! sends them over a synchronous `netlink-sys` socket and matches replies.

use std::io;
use std::os::fd::AsRawFd;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator, NLM_F_ACK, NLM_F_ACK_TLVS,
    NLM_F_REQUEST,
};
use netlink_packet_route::link::{
    LinkAttribute, LinkExtentMask, LinkFlags, LinkMessage, LinkVfInfo, VfInfo, VfInfoLinkState,
    VfInfoMac, VfInfoSpoofCheck, VfInfoTrust, VfInfoVlan, VfLinkState,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::{Error, LinkState, Result, VfConfig, VfSettings};

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

    /// Waits for the reply to request `seq`: the first inner message, or
    /// the ack (None). A negative ack becomes the kernel's errno.
    fn reply(&self, seq: u32, what: &str) -> Result<Option<RouteNetlinkMessage>> {
        loop {
            let buf = self.recv_datagram(what)?;
            let mut off = 0;
            while off < buf.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..])
                    .map_err(|e| Error::netlink(what, io::Error::other(e.to_string()), None))?;
                // deserialize checked 16 <= length <= what is left.
                off += (msg.header.length as usize).div_ceil(4) * 4;
                if msg.header.sequence_number != seq {
                    continue; // a late answer to an earlier request
                }
                match msg.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(None),
                            Some(_) => {
                                let extack = if msg.header.flags & NLM_F_ACK_TLVS != 0 {
                                    extack_message(&e.header)
                                } else {
                                    None
                                };
                                Err(Error::netlink(what, e.to_io(), extack))
                            }
                        };
                    }
                    NetlinkPayload::InnerMessage(m) => return Ok(Some(m)),
                    NetlinkPayload::Done(_) => return Ok(None),
                    _ => {}
                }
            }
        }
    }

    /// The `RTM_NEWLINK` answer for interface `ifindex`, with VF info.
    fn get_link(&mut self, ifindex: u32, what: &str) -> Result<LinkMessage> {
        let mut m = LinkMessage::default();
        m.header.index = ifindex;
        m.attributes.push(LinkAttribute::ExtMask(vec![
            LinkExtentMask::Vf,
            LinkExtentMask::SkipStats,
        ]));
        let seq = self.send(RouteNetlinkMessage::GetLink(m), false, what)?;
        match self.reply(seq, what)? {
            Some(RouteNetlinkMessage::NewLink(l)) => Ok(l),
            _ => Err(Error::netlink(
                what,
                io::Error::other("no RTM_NEWLINK in the kernel's answer"),
                None,
            )),
        }
    }

    /// `RTM_SETLINK` on `ifindex`, waiting for the kernel's ack.
    fn set_link(&mut self, m: LinkMessage, what: &str) -> Result<()> {
        let seq = self.send(RouteNetlinkMessage::SetLink(m), true, what)?;
        self.reply(seq, what).map(|_| ())
    }

    /// The admin settings of every VF the PF driver reports, by VF index.
    /// Empty for a netdev that is not a PF.
    pub fn vf_configs(&mut self, pf: &str) -> Result<Vec<VfConfig>> {
        let what = format!("reading VF settings of {pf}");
        let ifindex = ifindex(pf)?;
        let link = self.get_link(ifindex, &what)?;
        let mut out = Vec::new();
        for attr in link.attributes {
            if let LinkAttribute::VfInfoList(list) = attr {
                out.extend(list.iter().filter_map(vf_config));
            }
        }
        out.sort_by_key(|c| c.index);
        Ok(out)
    }

    /// Applies `s` to VF `index` of `pf` in one `RTM_SETLINK`.
    pub fn set_vf(&mut self, pf: &str, index: u32, s: &VfSettings) -> Result<()> {
        let what = format!("setting VF {index} of {pf}");
        let ifindex = ifindex(pf)?;
        let mut m = LinkMessage::default();
        m.header.index = ifindex;
        m.attributes
            .push(LinkAttribute::VfInfoList(vec![vf_info(index, s)]));
        self.set_link(m, &what)
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
    crate::if_index(name).ok_or_else(|| Error::NoSuchNetdev(name.to_string()))
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

/// The IFLA_VF_INFO that applies `s` to VF `index`.
fn vf_info(index: u32, s: &VfSettings) -> LinkVfInfo {
    let mut v = Vec::new();
    if let Some(mac) = s.mac {
        v.push(VfInfo::Mac(VfInfoMac::new(index, &mac)));
    }
    if let Some((vlan, qos)) = s.vlan {
        v.push(VfInfo::Vlan(VfInfoVlan::new(
            index,
            vlan.into(),
            qos.into(),
        )));
    }
    if let Some(on) = s.spoofchk {
        v.push(VfInfo::SpoofCheck(VfInfoSpoofCheck::new(index, on)));
    }
    if let Some(on) = s.trust {
        v.push(VfInfo::Trust(VfInfoTrust::new(index, on)));
    }
    if let Some(l) = s.link_state {
        let state = match l {
            LinkState::Auto => VfLinkState::Auto,
            LinkState::Enable => VfLinkState::Enable,
            LinkState::Disable => VfLinkState::Disable,
            LinkState::Other(n) => VfLinkState::Other(n),
        };
        v.push(VfInfo::LinkState(VfInfoLinkState::new(index, state)));
    }
    LinkVfInfo(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, Parseable};

    #[test]
    fn settings_round_trip_through_the_crate() {
        let s = VfSettings {
            mac: Some([0x52, 0x54, 0, 0x6d, 0x90, 2]),
            vlan: Some((42, 3)),
            spoofchk: Some(false),
            trust: Some(true),
            link_state: Some(LinkState::Disable),
        };
        let info = vf_info(5, &s);
        assert_eq!(info.0.len(), 5);
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
        assert_eq!(vf_info(0, &VfSettings::default()).0.len(), 0);
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
