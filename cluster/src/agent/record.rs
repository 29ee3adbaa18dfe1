//! Changes an agent makes to the record of a volume attached to its node
//! (its in-sync set, its snapshots): read, changed, written back at the
//! revision read, again on a conflict. Only while the volume is attached
//! to the node: an agent whose engine was taken over writes nothing.

use crate::model::{decode, encode, NodeName, Volume, VolumeName};
use crate::store::{Expect, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The change cannot be made: the answer is the same next time.
    #[error("{0}")]
    Refused(String),
}

/// Applies `change` to the record of `volume`, attached to `node`, and
/// writes it back if `change` says it changed it.
pub async fn update_attached<S: Store>(
    store: &S,
    node: &NodeName,
    volume: &VolumeName,
    mut change: impl FnMut(&mut Volume) -> Result<bool, String>,
) -> Result<(), RecordError> {
    let key = volume.key();
    for _ in 0..5 {
        let Some(v) = store.get(&key).await? else {
            return Err(RecordError::Refused(format!(
                "volume {volume} does not exist"
            )));
        };
        let mut next: Volume = decode(&key, &v)?;
        if next.attachment.as_ref().map(|a| &a.node) != Some(node) {
            return Err(RecordError::Refused(format!(
                "volume {volume} is not attached to {node}"
            )));
        }
        if !change(&mut next).map_err(RecordError::Refused)? {
            return Ok(());
        }
        match store
            .put(&key, encode(&next), Expect::At(v.revision), None)
            .await
        {
            Ok(_) => return Ok(()),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(RecordError::Store(StoreError::Unavailable(format!(
        "{key} kept changing; try again"
    ))))
}
