//! [`PrefixTable`]: longest-prefix match from overlay prefixes (IPv4 and IPv6) to a value.
//!
//! One hash map per prefix length in use, searched from the longest down: a lookup costs one hash
//! probe per distinct length (a handful in practice), whatever the number of prefixes.

use std::net::IpAddr;

// Searched for every packet, twice (its route out, its source's check in): a fast hasher,
// seeded per process, so that keys colliding in it (prefixes a member claims) cannot be
// worked out in advance.
use foldhash::HashMap;

use ipnet::IpNet;

/// A longest-prefix-match table.
#[derive(Debug, Clone)]
pub struct PrefixTable<T> {
    /// `(prefix length, masked address → value)`, longest first; IPv4 keys are the 32-bit value.
    v4: Levels<u32, T>,
    v6: Levels<u128, T>,
}

/// Per prefix length, longest first: masked address → (prefix, value).
type Levels<K, T> = Vec<(u8, HashMap<K, (IpNet, T)>)>;

impl<T> Default for PrefixTable<T> {
    fn default() -> Self {
        Self {
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

fn mask4(addr: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        addr & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask6(addr: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        addr & (u128::MAX << (128 - u32::from(len)))
    }
}

fn slot<K, V>(levels: &mut Vec<(u8, HashMap<K, V>)>, len: u8) -> &mut HashMap<K, V> {
    let pos = match levels.binary_search_by(|(l, _)| len.cmp(l)) {
        Ok(pos) => pos,
        Err(pos) => {
            levels.insert(pos, (len, HashMap::default()));
            pos
        }
    };
    &mut levels[pos].1
}

impl<T> PrefixTable<T> {
    /// Inserts `net → value`, returning the value it replaced.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        let net = net.trunc();
        let len = net.prefix_len();
        match net {
            IpNet::V4(n) => {
                let key = u32::from(n.network());
                slot(&mut self.v4, len)
                    .insert(key, (net, value))
                    .map(|(_, v)| v)
            }
            IpNet::V6(n) => {
                let key = u128::from(n.network());
                slot(&mut self.v6, len)
                    .insert(key, (net, value))
                    .map(|(_, v)| v)
            }
        }
    }

    /// Removes `net`, returning its value.
    pub fn remove(&mut self, net: IpNet) -> Option<T> {
        let net = net.trunc();
        let len = net.prefix_len();
        let removed = match net {
            IpNet::V4(n) => {
                let level = self.v4.iter_mut().find(|(l, _)| *l == len)?;
                level.1.remove(&u32::from(n.network())).map(|(_, v)| v)
            }
            IpNet::V6(n) => {
                let level = self.v6.iter_mut().find(|(l, _)| *l == len)?;
                level.1.remove(&u128::from(n.network())).map(|(_, v)| v)
            }
        };
        self.v4.retain(|(_, m)| !m.is_empty());
        self.v6.retain(|(_, m)| !m.is_empty());
        removed
    }

    /// Removes every entry whose value matches `pred`.
    pub fn retain(&mut self, mut keep: impl FnMut(&IpNet, &T) -> bool) {
        for (_, m) in &mut self.v4 {
            m.retain(|_, (n, v)| keep(n, v));
        }
        for (_, m) in &mut self.v6 {
            m.retain(|_, (n, v)| keep(n, v));
        }
        self.v4.retain(|(_, m)| !m.is_empty());
        self.v6.retain(|(_, m)| !m.is_empty());
    }

    /// The value of the longest prefix containing `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        match addr {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4
                    .iter()
                    .find_map(|(len, m)| m.get(&mask4(a, *len)))
                    .map(|(_, v)| v)
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6
                    .iter()
                    .find_map(|(len, m)| m.get(&mask6(a, *len)))
                    .map(|(_, v)| v)
            }
        }
    }

    /// Every `(prefix, value)`.
    pub fn iter(&self) -> impl Iterator<Item = (&IpNet, &T)> {
        let v4 = self.v4.iter().flat_map(|(_, m)| m.values());
        let v6 = self.v6.iter().flat_map(|(_, m)| m.values());
        v4.chain(v6).map(|(n, v)| (n, v))
    }

    /// The number of prefixes.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = PrefixTable::default();
        t.insert(net("100.64.0.0/16"), 1);
        t.insert(net("100.64.2.0/24"), 2);
        t.insert(net("0.0.0.0/0"), 0);
        t.insert(net("fd00::/64"), 6);
        assert_eq!(t.lookup("100.64.2.9".parse().unwrap()), Some(&2));
        assert_eq!(t.lookup("100.64.3.9".parse().unwrap()), Some(&1));
        assert_eq!(t.lookup("8.8.8.8".parse().unwrap()), Some(&0));
        assert_eq!(t.lookup("fd00::5".parse().unwrap()), Some(&6));
        assert_eq!(t.lookup("fd01::5".parse().unwrap()), None);
        assert_eq!(t.remove(net("100.64.2.0/24")), Some(2));
        assert_eq!(t.lookup("100.64.2.9".parse().unwrap()), Some(&1));
        t.retain(|_, v| *v != 1);
        assert_eq!(t.lookup("100.64.2.9".parse().unwrap()), Some(&0));
        assert_eq!(t.len(), 2);
    }

    proptest! {
        /// The table agrees with a linear scan for the longest containing prefix.
        #[test]
        fn agrees_with_linear_scan(prefixes in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..40), probes in proptest::collection::vec(any::<u32>(), 1..40)) {
            let mut t = PrefixTable::default();
            let mut list: Vec<IpNet> = Vec::new();
            for (a, l) in prefixes {
                let n = IpNet::new(std::net::Ipv4Addr::from(a).into(), l).unwrap().trunc();
                t.insert(n, n);
                list.retain(|x| *x != n);
                list.push(n);
            }
            for p in probes {
                let addr = IpAddr::from(std::net::Ipv4Addr::from(p));
                let want = list.iter().filter(|n| n.contains(&addr)).max_by_key(|n| n.prefix_len());
                prop_assert_eq!(t.lookup(addr), want);
            }
        }
    }
}
