//! Typed scalar values of the config file, each parsed in its own `Deserialize` so that a bad value
//! is reported with the line and key it came from.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ipnet::IpNet;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Implements `Deserialize` for a type through its `FromStr`, keeping the parse error's message.
macro_rules! deserialize_from_str {
    ($ty:ty, $what:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(|e| {
                    de::Error::custom(format_args!("invalid {} {:?}: {}", $what, s, e))
                })
            }
        }
    };
}

/// A network prefix in canonical form: no host bits set (`100.64.0.0/16`, not `100.64.1.1/16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr(pub IpNet);

/// Why a string is not a [`Cidr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Not of the form `address/length`.
    #[error("expected address/length, such as 100.64.0.0/16")]
    Syntax,
    /// Host bits are set below the prefix length.
    #[error("host bits are set; did you mean {0}?")]
    HostBits(IpNet),
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let net: IpNet = s.trim().parse().map_err(|_| CidrError::Syntax)?;
        if net.trunc() != net {
            return Err(CidrError::HostBits(net.trunc()));
        }
        Ok(Self(net))
    }
}
deserialize_from_str!(Cidr, "CIDR");

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// An IP address (`198.18.1.1`, `fd00::1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Address(pub IpAddr);

impl FromStr for Address {
    type Err = std::net::AddrParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim().parse().map(Self)
    }
}
deserialize_from_str!(Address, "IP address");

/// Whether `ip` may be a node's address on the underlay: not unspecified, loopback, multicast,
/// broadcast or link-local. The one rule for an address the node is reached at, whoever states
/// it: this config, a Kubernetes Node, a peer's signed record, a NAT report.
pub fn unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || a.is_broadcast()
                || a.is_link_local())
        }
        IpAddr::V6(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || a.is_unicast_link_local())
        }
    }
}

/// A UDP or TCP port, 1 to 65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        match u16::try_from(n) {
            Ok(p) if p != 0 => Ok(Self(p)),
            _ => Err(de::Error::custom(format_args!(
                "port {n} is out of range 1-65535"
            ))),
        }
    }
}

/// An `address:port` (`198.18.1.2:51820`, `[fd00::2]:51820`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint(pub SocketAddr);

impl FromStr for Endpoint {
    type Err = std::net::AddrParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim().parse().map(Self)
    }
}
deserialize_from_str!(Endpoint, "endpoint (address:port)");

/// A host with an optional port: `198.18.1.2`, `198.19.0.3:6783`, `fd00::3`, `[fd00::3]:6783`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// The address.
    pub ip: IpAddr,
    /// The port, when one was given.
    pub port: Option<u16>,
}

impl FromStr for HostPort {
    type Err = std::net::AddrParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(Self {
                ip: sa.ip(),
                port: Some(sa.port()),
            });
        }
        s.parse().map(|ip| Self { ip, port: None })
    }
}
deserialize_from_str!(HostPort, "peer address (address or address:port)");

/// A WireGuard public key: 32 bytes, base64 as `wg pubkey` prints it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

/// Why a string is not a [`PublicKey`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not valid base64.
    #[error("not valid base64")]
    Base64,
    /// Decodes to the wrong number of bytes.
    #[error("decodes to {0} bytes, a key has 32")]
    Length(usize),
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = BASE64.decode(s.trim()).map_err(|_| KeyError::Base64)?;
        let len = bytes.len();
        bytes
            .try_into()
            .map(Self)
            .map_err(|_| KeyError::Length(len))
    }
}
deserialize_from_str!(PublicKey, "WireGuard public key");

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// The ed25519 public key of a cluster's authority (`mesh.authority`): 32 bytes, base64 as
/// `weft authority pubkey` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AuthorityKey(pub [u8; 32]);

impl FromStr for AuthorityKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<PublicKey>().map(|k| Self(k.0))
    }
}
deserialize_from_str!(AuthorityKey, "authority public key");

/// A duration written with a unit: `90s`, `30m`, `24h`, `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// Why a string is not a [`HumanDuration`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// No number before the unit, or a number too large.
    #[error("expected a whole number followed by s, m, h or d, such as 24h")]
    Syntax,
}

impl FromStr for HumanDuration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or(DurationError::Syntax)?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| DurationError::Syntax)?;
        let mult = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => return Err(DurationError::Syntax),
        };
        n.checked_mul(mult)
            .map(|secs| Self(Duration::from_secs(secs)))
            .ok_or(DurationError::Syntax)
    }
}
deserialize_from_str!(HumanDuration, "duration");

/// One value or a list of them (`pod_network_cidr: 100.64.0.0/16` or a dual-stack list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneOrMany<T>(pub Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                T::deserialize(de::value::StrDeserializer::new(s)).map(|v| OneOrMany(vec![v]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_rejects_host_bits_and_suggests_the_network() {
        assert_eq!(
            "100.64.1.5/16".parse::<Cidr>(),
            Err(CidrError::HostBits("100.64.0.0/16".parse().unwrap()))
        );
        assert_eq!("100.64.0.0/33".parse::<Cidr>(), Err(CidrError::Syntax));
        assert!("fd00:64::/48".parse::<Cidr>().is_ok());
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(
            "24h".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(86400)
        );
        assert_eq!(
            "90s".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(90)
        );
        assert!("24".parse::<HumanDuration>().is_err());
        assert!("h".parse::<HumanDuration>().is_err());
        assert!("99999999999999999999d".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn host_port_with_and_without_port() {
        let a: HostPort = "198.19.0.3:6783".parse().unwrap();
        assert_eq!(a.port, Some(6783));
        let b: HostPort = "198.18.1.2".parse().unwrap();
        assert_eq!(b.port, None);
        let c: HostPort = "[fd00::3]:7".parse().unwrap();
        assert_eq!(c.port, Some(7));
    }

    #[test]
    fn public_key_length_is_checked() {
        assert_eq!("AAAA".parse::<PublicKey>(), Err(KeyError::Length(3)));
        assert_eq!("!!".parse::<PublicKey>(), Err(KeyError::Base64));
        let k = PublicKey([7; 32]);
        assert_eq!(k.to_string().parse::<PublicKey>(), Ok(k));
    }
}
