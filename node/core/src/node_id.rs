//! Node identity: a stable name (on Kubernetes the pod name, e.g. `kv-2`).

use std::fmt;
use std::sync::Arc;

/// Longest node id accepted anywhere (config, gossip, contexts).
pub const MAX_NODE_ID_LEN: usize = 253;

/// A node's stable name. Cheap to clone; ordered by its bytes so that every node sorts the same way.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(Arc<str>);

/// Why a string is not a valid node id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdError {
    #[error("node id is empty")]
    Empty,
    #[error("node id is {0} bytes long; the limit is {MAX_NODE_ID_LEN}")]
    TooLong(usize),
    #[error("node id {0:?} has a character outside [A-Za-z0-9._-]")]
    BadCharacter(String),
}

impl NodeId {
    /// Validates and wraps a node id: 1..=253 bytes of `[A-Za-z0-9._-]` (a DNS label or pod name fits).
    pub fn new(id: impl AsRef<str>) -> Result<Self, NodeIdError> {
        let id = id.as_ref();
        if id.is_empty() {
            return Err(NodeIdError::Empty);
        }
        if id.len() > MAX_NODE_ID_LEN {
            return Err(NodeIdError::TooLong(id.len()));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(NodeIdError::BadCharacter(id.to_string()));
        }
        Ok(NodeId(Arc::from(id)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = NodeIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        NodeId::new(s)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.0.to_string()
    }
}

impl std::str::FromStr for NodeId {
    type Err = NodeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeId::new(s)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl AsRef<str> for NodeId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for NodeId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names_are_valid_node_ids() {
        assert_eq!(NodeId::new("kv-2").unwrap().as_str(), "kv-2");
    }

    #[test]
    fn empty_long_and_odd_ids_are_refused() {
        assert_eq!(NodeId::new(""), Err(NodeIdError::Empty));
        assert_eq!(NodeId::new("a".repeat(254)), Err(NodeIdError::TooLong(254)));
        assert!(matches!(
            NodeId::new("a b"),
            Err(NodeIdError::BadCharacter(_))
        ));
    }
}
