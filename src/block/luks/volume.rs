//! A LUKS header on a node, at a base offset (0 for a luks image or a
//! detached header, the crypt header extension's offset inside a qcow2
//! file): unlocking it, writing a new one, and amending its key slots.
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::block::driver::WriteFlags;
use crate::block::error::{BlockError, BlockResult};
use crate::block::node::Node;
use diskcrypt::luks::{self, Header, Key, Params};
use diskcrypt::SectorCrypto;

/// Where a LUKS header lives.
#[derive(Clone)]
pub struct Region {
    pub node: Arc<Node>,
    pub base: u64,
}

impl Region {
    async fn read(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.node.read(self.base + offset, buf).await
    }

    async fn write(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        self.node
            .write(self.base + offset, buf, WriteFlags::default())
            .await
    }

    /// The header, parsed and checked.
    pub async fn header(&self, detached: bool) -> BlockResult<Header> {
        if self.node.size() < self.base + luks::HEADER_LEN as u64 {
            return Err(BlockError::inval("Volume is not in LUKS format"));
        }
        let mut b = vec![0u8; luks::HEADER_LEN];
        self.read(0, &mut b).await?;
        Header::parse(&b, detached).map_err(BlockError::inval)
    }

    /// The master key from the first slot `password` opens, or None.
    async fn try_slot(
        &self,
        h: &Header,
        p: &Params,
        i: usize,
        password: &[u8],
    ) -> BlockResult<Option<Key>> {
        if !h.slot_active(i) {
            return Ok(None);
        }
        let (off, len) = h.material_range(i).map_err(BlockError::inval)?;
        let mut m = Key(vec![0u8; len]);
        self.read(off, &mut m.0).await?;
        h.try_slot(p, i, password, &m.0).map_err(BlockError::inval)
    }

    async fn find_key(&self, h: &Header, p: &Params, password: &[u8]) -> BlockResult<Key> {
        for i in 0..luks::NUM_SLOTS {
            if let Some(k) = self.try_slot(h, p, i, password).await? {
                return Ok(k);
            }
        }
        Err(BlockError::new(
            nix::libc::EACCES,
            "Invalid password, cannot unlock any keyslot",
        ))
    }

    /// Opens the volume: the payload's cipher and the header.
    pub async fn unlock(
        &self,
        password: &[u8],
        detached: bool,
    ) -> BlockResult<(Header, Params, SectorCrypto)> {
        let h = self.header(detached).await?;
        let p = h.params().map_err(BlockError::unsupported)?;
        let master = self.find_key(&h, &p, password).await?;
        let c = p.crypto(&master.0).map_err(BlockError::unsupported)?;
        Ok((h, p, c))
    }

    /// Writes a new header and slot 0's key material (from
    /// [`new_header`]) at the start of the region.
    pub async fn write_new(&self, h: &Header, material: &[u8]) -> Result<(), String> {
        let (off, _) = h.material_range(0)?;
        self.write(off, material).await.map_err(|e| e.msg)?;
        self.write(0, &h.to_bytes()).await.map_err(|e| e.msg)
    }

    /// x-blockdev-amend's LUKS options on this header (`secrets` holds
    /// the values of the secrets they name; `current` is the secret the
    /// volume was opened with). QEMU's checks and messages.
    pub async fn amend(
        &self,
        h: &mut Header,
        p: &Params,
        o: &Map<String, Value>,
        secrets: &crate::objects::Secrets,
        current: Option<&str>,
        force: bool,
    ) -> Result<(), String> {
        let st = |k: &str| o.get(k).and_then(Value::as_str);
        let keyslot = o.get("keyslot").and_then(Value::as_i64);
        match st("state") {
            Some("active") => {
                let iter_time = match o.get("iter-time").and_then(Value::as_i64) {
                    Some(t) => t as u64,
                    None => luks::DEFAULT_ITER_TIME_MS,
                };
                let Some(new) = st("new-secret") else {
                    return Err("'new-secret' is required to activate a keyslot".into());
                };
                if o.contains_key("old-secret") {
                    return Err("'old-secret' must not be given when activating keyslots".into());
                }
                let slot = match keyslot {
                    Some(k) if !(0..luks::NUM_SLOTS as i64).contains(&k) => {
                        return Err(format!(
                            "Invalid keyslot {} specified, must be between 0 and {}",
                            k as u32,
                            luks::NUM_SLOTS - 1
                        ))
                    }
                    Some(k) => k as usize,
                    None => (0..luks::NUM_SLOTS)
                        .find(|&i| !h.slot_active(i))
                        .ok_or("Can't add a keyslot - all keyslots are in use")?,
                };
                if !force && h.slot_active(slot) {
                    return Err(format!(
                        "Refusing to overwrite active keyslot {slot} - please erase it first"
                    ));
                }
                let old_id = st("secret").or(current).unwrap_or_default();
                let old = secrets.get(old_id)?;
                let master = self.find_key(h, p, &old.0).await.map_err(|e| e.msg)?;
                let new_pw = secrets.get(new)?;
                let (mut h2, p2) = (h.clone(), *p);
                let (h3, material) = tokio::task::spawn_blocking(move || {
                    let m = h2.store_slot(&p2, slot, &new_pw.0, &master.0, iter_time);
                    m.map(|m| (h2, m))
                })
                .await
                .map_err(|e| e.to_string())??;
                let (off, _) = h3.material_range(slot)?;
                self.write(off, &material).await.map_err(|e| e.msg)?;
                self.write(0, &h3.to_bytes()).await.map_err(|e| e.msg)?;
                *h = h3;
                Ok(())
            }
            _ => {
                for (k, what) in [
                    ("new-secret", "'new-secret'"),
                    ("iter-time", "'iter-time'"),
                    ("secret", "'secret'"),
                ] {
                    if o.contains_key(k) {
                        return Err(format!("{what} must not be given when erasing keyslots"));
                    }
                }
                let old = st("old-secret").map(|id| secrets.get(id)).transpose()?;
                let mut erase = Vec::new();
                if let Some(k) = keyslot {
                    if !(0..luks::NUM_SLOTS as i64).contains(&k) {
                        return Err(format!(
                            "Invalid keyslot {k} specified, must be between 0 and {}",
                            luks::NUM_SLOTS - 1
                        ));
                    }
                    let k = k as usize;
                    if let Some(pw) = &old {
                        if self
                            .try_slot(h, p, k, &pw.0)
                            .await
                            .map_err(|e| e.msg)?
                            .is_none()
                        {
                            return Err(format!(
                                "Given keyslot {k} doesn't contain the given old password for erase operation"
                            ));
                        }
                    }
                    if !force && !h.slot_active(k) {
                        return Err(format!("Given keyslot {k} is already erased (inactive) "));
                    }
                    if !force && h.active_slots() == 1 {
                        return Err(format!(
                            "Attempt to erase the only active keyslot {k} which will erase all the data in the image irreversibly - refusing operation"
                        ));
                    }
                    erase.push(k);
                } else if let Some(pw) = &old {
                    for i in 0..luks::NUM_SLOTS {
                        if self
                            .try_slot(h, p, i, &pw.0)
                            .await
                            .map_err(|e| e.msg)?
                            .is_some()
                        {
                            erase.push(i);
                        }
                    }
                    if erase.is_empty() {
                        return Err(
                            "No keyslots match given (old) password for erase operation".into()
                        );
                    }
                    if !force && erase.len() == h.active_slots() {
                        return Err("All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation".into());
                    }
                } else {
                    return Err("To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given".into());
                }
                for i in erase {
                    let len = h.erase_slot(i);
                    self.write(0, &h.to_bytes()).await.map_err(|e| e.msg)?;
                    let (off, _) = h.material_range(i)?;
                    for _ in 0..luks::ERASE_PASS_COUNT {
                        self.write(off, &luks::garbage(len))
                            .await
                            .map_err(|e| e.msg)?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// A new LUKS header with slot 0 behind `password`, its key material and
/// the payload's cipher. PBKDF2's calibration and derivation take CPU
/// seconds, so they run on a blocking thread.
pub async fn new_header(
    o: &luks::CreateOpts,
    password: &Key,
) -> Result<(Header, Vec<u8>, SectorCrypto), String> {
    let (o, pw) = (*o, password.clone());
    let (h, material, master) = tokio::task::spawn_blocking(move || luks::create(&o, &pw.0))
        .await
        .map_err(|e| e.to_string())??;
    let c = h.params()?.crypto(&master.0)?;
    Ok((h, material, c))
}
