//! Crafted packets for fixture tests, with checksums computed from scratch
//! (RFC 1071) so they are an oracle independent of the incremental updates the
//! data plane makes.

#![allow(dead_code)]

use std::net::Ipv4Addr;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        src_port: u16,
        dst_port: u16,
        flags: u8,
        seq: u32,
        ack: u32,
        window: u16,
    },
    /// `checksum: false` sends the "no checksum" zero UDP allows.
    Udp {
        src_port: u16,
        dst_port: u16,
        checksum: bool,
    },
    IcmpEcho,
    /// An ICMP message with this type, code and second header word; the
    /// packet's payload is its body (e.g. a quoted packet).
    Icmp {
        kind: u8,
        code: u8,
        rest: u32,
    },
}

/// An Ethernet + IPv4 + L4 packet, described field by field.
#[derive(Clone, Debug)]
pub struct Ipv4Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    /// IP options; padded by the caller to a multiple of 4 bytes.
    pub options: Vec<u8>,
    /// Flags and fragment offset, host order (0x2000 = MF).
    pub frag: u16,
    pub id: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Ipv4Packet {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
        Ipv4Packet {
            src: src.0,
            dst: dst.0,
            ttl: 64,
            options: Vec::new(),
            frag: 0x4000, // DF, as Linux sends TCP
            id: 0x1234,
            l4: L4::Tcp {
                src_port: src.1,
                dst_port: dst.1,
                flags: 0x02, // SYN
                seq: 0x0102_0304,
                ack: 0,
                window: 64240,
            },
            payload: b"vipr fixture payload".to_vec(),
        }
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
        Ipv4Packet {
            l4: L4::Udp {
                src_port: src.1,
                dst_port: dst.1,
                checksum: true,
            },
            frag: 0,
            ..Self::tcp(src, dst)
        }
    }

    pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Ipv4Packet {
            l4: L4::IcmpEcho,
            frag: 0,
            ..Self::tcp((src, 1), (dst, 1))
        }
    }

    /// The same packet with its destination replaced.
    pub fn with_dst(mut self, addr: Ipv4Addr, port: u16) -> Self {
        self.dst = addr;
        match &mut self.l4 {
            L4::Tcp { dst_port, .. } | L4::Udp { dst_port, .. } => *dst_port = port,
            L4::IcmpEcho | L4::Icmp { .. } => {}
        }
        self
    }

    /// The same packet with its source replaced.
    pub fn with_src(mut self, addr: Ipv4Addr, port: u16) -> Self {
        self.src = addr;
        match &mut self.l4 {
            L4::Tcp { src_port, .. } | L4::Udp { src_port, .. } => *src_port = port,
            L4::IcmpEcho | L4::Icmp { .. } => {}
        }
        self
    }

    /// The reply a backend sends back for this packet.
    pub fn reply(&self) -> Self {
        let mut reply = self.clone();
        reply.src = self.dst;
        reply.dst = self.src;
        match &mut reply.l4 {
            L4::Tcp {
                src_port,
                dst_port,
                flags,
                ..
            } => {
                std::mem::swap(src_port, dst_port);
                *flags = 0x12; // SYN-ACK
            }
            L4::Udp {
                src_port, dst_port, ..
            } => std::mem::swap(src_port, dst_port),
            L4::IcmpEcho | L4::Icmp { .. } => {}
        }
        reply
    }

    pub fn protocol(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::IcmpEcho | L4::Icmp { .. } => 1,
        }
    }

    pub fn l4_bytes(&self) -> Vec<u8> {
        let mut l4 = match self.l4 {
            L4::Tcp {
                src_port,
                dst_port,
                flags,
                seq,
                ack,
                window,
            } => {
                let mut h = Vec::with_capacity(20);
                h.extend(src_port.to_be_bytes());
                h.extend(dst_port.to_be_bytes());
                h.extend(seq.to_be_bytes());
                h.extend(ack.to_be_bytes());
                h.push(5 << 4); // data offset
                h.push(flags);
                h.extend(window.to_be_bytes());
                h.extend([0, 0]); // checksum, filled below
                h.extend([0, 0]); // urgent
                h
            }
            L4::Udp {
                src_port, dst_port, ..
            } => {
                let mut h = Vec::with_capacity(8);
                h.extend(src_port.to_be_bytes());
                h.extend(dst_port.to_be_bytes());
                h.extend(((8 + self.payload.len()) as u16).to_be_bytes());
                h.extend([0, 0]);
                h
            }
            L4::IcmpEcho => vec![8, 0, 0, 0, 0, 1, 0, 1],
            L4::Icmp { kind, code, rest } => {
                let mut h = vec![kind, code, 0, 0];
                h.extend(rest.to_be_bytes());
                h
            }
        };
        l4.extend(&self.payload);
        let checksum = match self.l4 {
            L4::Tcp { .. } => Some((16, pseudo_checksum(self.src, self.dst, 6, &l4))),
            L4::Udp { checksum: true, .. } => {
                let c = pseudo_checksum(self.src, self.dst, 17, &l4);
                Some((6, if c == 0 { 0xffff } else { c }))
            }
            L4::Udp {
                checksum: false, ..
            } => None,
            L4::IcmpEcho | L4::Icmp { .. } => Some((2, internet_checksum(&l4))),
        };
        if let Some((offset, sum)) = checksum {
            l4[offset..offset + 2].copy_from_slice(&sum.to_be_bytes());
        }
        l4
    }

    pub fn ip_header(&self, total_len: usize) -> Vec<u8> {
        let ihl = (20 + self.options.len()) / 4;
        let mut h = Vec::with_capacity(ihl * 4);
        h.push(0x40 | ihl as u8);
        h.push(0);
        h.extend((total_len as u16).to_be_bytes());
        h.extend(self.id.to_be_bytes());
        h.extend(self.frag.to_be_bytes());
        h.push(self.ttl);
        h.push(self.protocol());
        h.extend([0, 0]);
        h.extend(self.src.octets());
        h.extend(self.dst.octets());
        h.extend(&self.options);
        let sum = internet_checksum(&h);
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        h
    }

    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let ip = self.ip_header(20 + self.options.len() + l4.len());
        let mut frame = ethernet(ETH_P_IP);
        frame.extend(ip);
        frame.extend(l4);
        frame
    }
}

impl Ipv4Packet {
    /// The TCP flags, sequence and acknowledgement numbers replaced.
    pub fn with_tcp(mut self, new_flags: u8, new_seq: u32, new_ack: u32) -> Self {
        if let L4::Tcp {
            flags, seq, ack, ..
        } = &mut self.l4
        {
            *flags = new_flags;
            *seq = new_seq;
            *ack = new_ack;
        }
        self
    }

    /// The RST (from the frontend, addresses and ports swapped) that a
    /// kernel would send to refuse this SYN: RST|ACK, seq 0, everything the
    /// segment occupied acknowledged; Ethernet addresses swapped.
    pub fn refusing_rst(&self) -> Vec<u8> {
        let L4::Tcp {
            src_port,
            dst_port,
            flags,
            seq,
            ack,
            ..
        } = self.l4
        else {
            panic!("not TCP");
        };
        let (rst_seq, rst_ack, rst_flags) = if flags & 0x10 != 0 {
            (ack, 0, 0x04)
        } else {
            let occupied = self.payload.len() as u32
                + u32::from(flags & 0x02 != 0)
                + u32::from(flags & 0x01 != 0);
            (0, seq.wrapping_add(occupied), 0x14)
        };
        let rst = Ipv4Packet {
            src: self.dst,
            dst: self.src,
            ttl: 64,
            options: Vec::new(),
            frag: 0x4000,
            id: 0,
            l4: L4::Tcp {
                src_port: dst_port,
                dst_port: src_port,
                flags: rst_flags,
                seq: rst_seq,
                ack: rst_ack,
                window: 0,
            },
            payload: Vec::new(),
        };
        swap_macs(rst.build())
    }

    /// The ICMP port unreachable refusing this (UDP) packet, from its
    /// destination: the original IP header and 8 bytes quoted.
    pub fn refusing_port_unreachable(&self) -> Vec<u8> {
        let frame = self.build();
        let ihl = 20 + self.options.len();
        let icmp = Ipv4Packet {
            src: self.dst,
            dst: self.src,
            ttl: 64,
            options: Vec::new(),
            frag: 0x4000,
            id: 0,
            l4: L4::Icmp {
                kind: 3,
                code: 3,
                rest: 0,
            },
            payload: frame[14..14 + ihl + 8].to_vec(),
        };
        swap_macs(icmp.build())
    }
}

/// An ICMP error of `kind`/`code` from `from` to `to` quoting the first
/// `quote_len` bytes of `quoted`'s IP packet.
pub fn icmp_error(
    from: Ipv4Addr,
    to: Ipv4Addr,
    kind: u8,
    code: u8,
    rest: u32,
    quoted: &Ipv4Packet,
    quote_len: usize,
) -> Ipv4Packet {
    let frame = quoted.build();
    let ip = &frame[14..];
    Ipv4Packet {
        src: from,
        dst: to,
        ttl: 64,
        options: Vec::new(),
        frag: 0,
        id: 0x4321,
        l4: L4::Icmp { kind, code, rest },
        payload: ip[..quote_len.min(ip.len())].to_vec(),
    }
}

/// The frame with its Ethernet source and destination swapped.
pub fn swap_macs(mut frame: Vec<u8>) -> Vec<u8> {
    let (dst, src) = frame.split_at_mut(6);
    dst.swap_with_slice(&mut src[..6]);
    frame
}

pub fn ethernet(ether_type: u16) -> Vec<u8> {
    let mut frame = Vec::with_capacity(128);
    frame.extend(NODE_MAC);
    frame.extend(CLIENT_MAC);
    frame.extend(ether_type.to_be_bytes());
    frame
}

/// RFC 1071 checksum of `data`.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// TCP/UDP checksum over the IPv4 pseudo-header and the segment.
pub fn pseudo_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let mut data = Vec::with_capacity(12 + segment.len());
    data.extend(src.octets());
    data.extend(dst.octets());
    data.push(0);
    data.push(proto);
    data.extend((segment.len() as u16).to_be_bytes());
    data.extend(segment);
    internet_checksum(&data)
}

/// Checks the IP header checksum and the L4 checksum of an Ethernet + IPv4
/// frame from scratch; returns a description of the first bad one.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if internet_checksum(&ip[..ihl]) != 0 {
        return Err("bad IPv4 header checksum".into());
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let segment = &ip[ihl..];
    match ip[9] {
        1 if internet_checksum(segment) != 0 => Err("bad ICMP checksum".into()),
        6 if pseudo_checksum(src, dst, 6, segment) != 0 => Err("bad TCP checksum".into()),
        17 if segment[6..8] != [0, 0] && pseudo_checksum(src, dst, 17, segment) != 0 => {
            Err("bad UDP checksum".into())
        }
        _ => Ok(()),
    }
}
