//! [`Snapshot`]: a node's blocks as the daemon persists them in `state_dir`.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The format version this build writes and reads.
const VERSION: u32 = 1;

/// One block a node holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBlock {
    /// The block.
    pub block: IpNet,
    /// When this node first claimed it.
    pub since: u64,
}

/// A node's blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// The format version.
    pub version: u32,
    /// The blocks, one per family.
    pub blocks: Vec<SavedBlock>,
}

/// Why a snapshot could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Not valid JSON of a snapshot.
    #[error("not a weft IPAM state file: {0}")]
    Corrupt(#[source] serde_json::Error),
    /// Written by another format version.
    #[error("IPAM state format version {0}, this build reads {VERSION}")]
    Version(u32),
}

impl Snapshot {
    /// A snapshot of `blocks`.
    pub fn new(blocks: Vec<SavedBlock>) -> Self {
        Self {
            version: VERSION,
            blocks,
        }
    }

    /// Its JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Parses JSON text.
    pub fn from_json(text: &str) -> Result<Self, SnapshotError> {
        let s: Self = serde_json::from_str(text).map_err(SnapshotError::Corrupt)?;
        if s.version != VERSION {
            return Err(SnapshotError::Version(s.version));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let s = Snapshot::new(vec![SavedBlock {
            block: "100.64.7.0/24".parse().unwrap(),
            since: 42,
        }]);
        assert_eq!(Snapshot::from_json(&s.to_json()).unwrap(), s);
        assert!(matches!(
            Snapshot::from_json("{\"version\":1,"),
            Err(SnapshotError::Corrupt(_))
        ));
        assert!(matches!(
            Snapshot::from_json("{\"version\":9,\"blocks\":[]}"),
            Err(SnapshotError::Version(9))
        ));
        assert!(Snapshot::from_json("{\"version\":1,\"blocks\":[],\"x\":1}").is_err());
    }
}
