//! Encryption at rest: the engine seals every block before it leaves, so
//! replicas, the network between them and anything copied from their
//! disks hold only ciphertext.
//!
//! # How a block is sealed
//!
//! AES-256-GCM-SIV, a fresh random 96-bit nonce for every write of a
//! block, and as associated data the volume's UUID and the block's number.
//! The nonce and the 16-byte tag (28 bytes, the block's *auth*) travel
//! after the blocks of a payload and are kept by the replicas beside the
//! block's checksums (`rvol_replica::checksum`), which cover the
//! ciphertext: scrub, rebuild, snapshots, purge and trim never need the
//! key.
//!
//! # What it protects, and why that holds
//!
//! - **Reading.** Without the key, a replica's files, its traffic and a
//!   stolen disk are AES-256 ciphertext. What they show: which blocks
//!   were ever written (holes and blocks zeroed by WRITE_ZEROES have no
//!   auth and read as zeros), and when a block is rewritten.
//! - **Tampering.** A flipped bit fails the tag. A block moved to another
//!   offset, or copied from another volume sealed with the same secret,
//!   fails it too: the block number and volume are in the associated data
//!   (Crucible's upstairs leaves them out, which lets a replica swap
//!   blocks unnoticed). A block that fails is handled like a checksum
//!   mismatch: read from another replica, and the bad one rebuilt; if no
//!   replica has a block that opens, the read fails with EIO, never
//!   returning garbage.
//! - **Not caught.** A replica that answers with an *older* sealed
//!   version of the same block, or with a hole where there was data, is
//!   not detected: tags per block cannot tell a rollback (that needs a
//!   version per block kept by the engine, which a restarted engine would
//!   have to trust a replica for anyway). Mutual TLS keeps strangers from
//!   being a replica; this is about a replica's own disk.
//! - **Nonces.** Random 96-bit nonces collide with probability about
//!   n²/2⁹⁷ after n block writes (2⁻³³ after 2³² writes, 16 TiB written
//!   to one volume). GCM-SIV was chosen over GCM because a repeated nonce
//!   then reveals only whether the two blocks were equal, instead of the
//!   XOR of the plaintexts and the authentication key.
//!
//! # Keys
//!
//! The key file holds a secret of at least 32 bytes (`head -c 32
//! /dev/urandom`, or any longer passphrase file of that much entropy).
//! The volume's data key is HKDF-SHA256 of it with the volume's UUID as
//! salt, so volumes that share a secret do not share a key; its key check
//! value, kept in every replica's `replica.json`, is another HKDF output
//! from the same secret and salt: it tells an engine that its key is the
//! volume's, or refuses it at start, and says nothing about the key. The
//! secret and derived bytes are zeroized once the key is made (AWS-LC
//! cleanses its key schedule when the key is dropped).

use std::path::Path;

use anyhow::{bail, Context};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM_SIV, NONCE_LEN};
use aws_lc_rs::hkdf;
use bytes::{Bytes, BytesMut};
use rvol_replica::meta::{Encryption, CIPHER_AES_256_GCM_SIV};
use rvol_replica::BLOCK_SIZE;
use uuid::Uuid;
use zeroize::Zeroizing;

/// Bytes of nonce and tag per block.
pub const AUTH: usize = NONCE_LEN + 16;
const BLOCK: usize = BLOCK_SIZE as usize;
/// Shortest secret accepted in a key file.
pub const MIN_SECRET: usize = 32;

/// A volume's data key.
pub struct VolumeKey {
    key: LessSafeKey,
    volume: Uuid,
    check: String,
}

/// A block that did not open: altered, moved, from another volume, or
/// sealed with another key.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("block {0} fails authentication (altered, moved, or not this volume's)")]
pub struct Unauthentic(pub u64);

/// Sealing failed: the system's random source gave no nonces.
#[derive(Debug, thiserror::Error)]
#[error("sealing failed: the system's random source gave no nonces")]
pub struct SealFailed;

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl VolumeKey {
    /// The key of `volume` from the secret in `path`.
    pub fn load(path: &Path, volume: Uuid) -> anyhow::Result<VolumeKey> {
        let secret = Zeroizing::new(
            std::fs::read(path)
                .with_context(|| format!("reading the encryption key file {}", path.display()))?,
        );
        VolumeKey::from_secret(&secret, volume)
            .with_context(|| format!("the encryption key file {}", path.display()))
    }

    pub fn from_secret(secret: &[u8], volume: Uuid) -> anyhow::Result<VolumeKey> {
        if secret.len() < MIN_SECRET {
            bail!(
                "holds {} bytes; a key needs at least {MIN_SECRET} (head -c 32 /dev/urandom)",
                secret.len()
            );
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, volume.as_bytes()).extract(secret);
        let derive = |info: &[u8], n: usize| -> anyhow::Result<Zeroizing<Vec<u8>>> {
            let mut out = Zeroizing::new(vec![0u8; n]);
            prk.expand(&[info], Len(n))
                .and_then(|okm| okm.fill(&mut out))
                .map_err(|_| anyhow::anyhow!("deriving a key failed"))?;
            Ok(out)
        };
        let data_key = derive(b"rvol data key v1", 32)?;
        let check = derive(b"rvol key check v1", 32)?;
        let key = UnboundKey::new(&AES_256_GCM_SIV, &data_key)
            .map_err(|_| anyhow::anyhow!("AES-256-GCM-SIV refused the key"))?;
        Ok(VolumeKey {
            key: LessSafeKey::new(key),
            volume,
            check: hex(&check),
        })
    }

    /// What the replicas keep of this key.
    pub fn encryption(&self) -> Encryption {
        Encryption {
            cipher: CIPHER_AES_256_GCM_SIV.into(),
            key_check: self.check.clone(),
        }
    }

    fn aad(&self, block: u64) -> Aad<[u8; 24]> {
        let mut aad = [0u8; 24];
        aad[..16].copy_from_slice(self.volume.as_bytes());
        aad[16..].copy_from_slice(&block.to_le_bytes());
        Aad::from(aad)
    }

    /// Seals whole blocks that start at block `first`: the payload to send,
    /// the sealed blocks followed by their auths. Fails only if the
    /// system's random source does.
    pub fn seal(&self, first: u64, data: &[u8]) -> Result<Bytes, SealFailed> {
        let blocks = data.len() / BLOCK;
        let mut out = BytesMut::with_capacity(data.len() + blocks * AUTH);
        out.extend_from_slice(data);
        out.resize(data.len() + blocks * AUTH, 0);
        let (sealed, auths) = out.split_at_mut(data.len());
        // Every nonce at once: one call for the random bytes of a write.
        let mut nonces = vec![0u8; blocks * NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonces).map_err(|_| SealFailed)?;
        for (i, (block, auth)) in sealed
            .chunks_exact_mut(BLOCK)
            .zip(auths.chunks_exact_mut(AUTH))
            .enumerate()
        {
            let nonce = &nonces[i * NONCE_LEN..(i + 1) * NONCE_LEN];
            let tag = Nonce::try_assume_unique_for_key(nonce)
                .and_then(|nonce| {
                    self.key
                        .seal_in_place_separate_tag(nonce, self.aad(first + i as u64), block)
                })
                .map_err(|_| SealFailed)?;
            auth[..NONCE_LEN].copy_from_slice(nonce);
            auth[NONCE_LEN..].copy_from_slice(tag.as_ref());
        }
        Ok(out.freeze())
    }

    /// Opens a payload of `len` bytes of sealed blocks that start at block
    /// `first`, followed by their auths. A block with an auth of zeros
    /// reads as zeros if it is zeros (a hole, or WRITE_ZEROES), and fails
    /// otherwise.
    pub fn open(&self, first: u64, payload: &[u8], len: usize) -> Result<Bytes, Unauthentic> {
        let blocks = len / BLOCK;
        if payload.len() != len + blocks * AUTH {
            return Err(Unauthentic(first));
        }
        let mut out = BytesMut::from(&payload[..len]);
        let auths = &payload[len..];
        for (i, (block, auth)) in out
            .chunks_exact_mut(BLOCK)
            .zip(auths.chunks_exact(AUTH))
            .enumerate()
        {
            let n = first + i as u64;
            if auth.iter().all(|&b| b == 0) {
                if block.iter().all(|&b| b == 0) {
                    continue;
                }
                return Err(Unauthentic(n));
            }
            Nonce::try_assume_unique_for_key(&auth[..NONCE_LEN])
                .and_then(|nonce| {
                    self.key.open_in_place_separate_tag(
                        nonce,
                        self.aad(n),
                        &auth[NONCE_LEN..],
                        block,
                    )
                })
                .map_err(|_| Unauthentic(n))?;
        }
        Ok(out.freeze())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(secret: u8, volume: Uuid) -> VolumeKey {
        VolumeKey::from_secret(&[secret; 32], volume).unwrap()
    }

    #[test]
    fn blocks_open_only_where_and_for_whom_they_were_sealed() {
        let vol = Uuid::new_v4();
        let k = key(1, vol);
        let data: Vec<u8> = (0..2 * BLOCK).map(|i| (i % 251) as u8).collect();
        let sealed = k.seal(10, &data).unwrap();
        assert_eq!(sealed.len(), 2 * BLOCK + 2 * AUTH);
        assert!(
            !sealed.windows(64).any(|w| w == &data[..64]),
            "the plaintext does not show"
        );
        assert_eq!(&k.open(10, &sealed, 2 * BLOCK).unwrap()[..], &data[..]);
        // Another offset, another volume, another secret.
        assert_eq!(k.open(11, &sealed, 2 * BLOCK), Err(Unauthentic(11)));
        assert!(key(1, Uuid::new_v4()).open(10, &sealed, 2 * BLOCK).is_err());
        assert!(key(2, vol).open(10, &sealed, 2 * BLOCK).is_err());
        // A flipped bit in a block, or in its tag.
        for at in [5, 2 * BLOCK + AUTH + 20] {
            let mut bad = sealed.to_vec();
            bad[at] ^= 1;
            assert!(k.open(10, &bad, 2 * BLOCK).is_err());
        }
        // Blocks swapped with their auths: each is at the wrong number.
        let mut swapped = sealed[BLOCK..2 * BLOCK].to_vec();
        swapped.extend_from_slice(&sealed[..BLOCK]);
        swapped.extend_from_slice(&sealed[2 * BLOCK + AUTH..]);
        swapped.extend_from_slice(&sealed[2 * BLOCK..2 * BLOCK + AUTH]);
        assert_eq!(k.open(10, &swapped, 2 * BLOCK), Err(Unauthentic(10)));
        // Each write of the same data gets a new nonce.
        assert_ne!(k.seal(10, &data).unwrap(), sealed);
    }

    #[test]
    fn a_hole_reads_as_zeros_and_data_without_an_auth_does_not() {
        let k = key(1, Uuid::new_v4());
        let mut payload = vec![0u8; BLOCK + AUTH];
        assert_eq!(&k.open(0, &payload, BLOCK).unwrap()[..], &[0u8; BLOCK][..]);
        payload[7] = 1;
        assert_eq!(k.open(0, &payload, BLOCK), Err(Unauthentic(0)));
    }

    #[test]
    fn the_key_check_names_the_secret_and_volume_and_short_secrets_are_refused() {
        let vol = Uuid::new_v4();
        assert_eq!(key(1, vol).encryption(), key(1, vol).encryption());
        assert_ne!(key(1, vol).encryption(), key(2, vol).encryption());
        assert_ne!(
            key(1, vol).encryption(),
            key(1, Uuid::new_v4()).encryption()
        );
        let e = VolumeKey::from_secret(&[1; 31], vol).err().unwrap();
        assert!(e.to_string().contains("at least 32"), "{e}");
    }
}
