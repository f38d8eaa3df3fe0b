//! Crash-safe persistence in one redb file (`store.redb` under the state dir).
//!
//! redb commits are atomic and, with the default `Durability::Immediate`, fsynced
//! before `commit` returns: an apply reported as stored survives `kill -9` and power
//! loss, and a crash mid-commit leaves the previous consistent state. A whole batch is
//! one write transaction, which is what makes multi-document apply all-or-nothing on
//! disk too. Values are the objects' Kubernetes JSON, so the file's contents stay
//! readable with standard tools and survive k8s-openapi upgrades.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::{Result, StoreError, storage};
use crate::object::{Object, ObjectKey};

/// `plural/namespace/name` -> object JSON.
const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
/// Store-wide counters; `revision` is the last committed resourceVersion.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";

pub(crate) const FILE_NAME: &str = "store.redb";
/// redb's page cache: enough for the tree's inner pages during a commit
/// (which stay resident, up to this size, after a big apply).
const PAGE_CACHE_BYTES: usize = 4 << 20;

/// One staged write of a batch.
pub(crate) enum Write<'a> {
    Put(&'a ObjectKey, &'a Object),
    Delete(&'a ObjectKey),
}

pub(crate) struct Disk {
    db: Database,
    path: PathBuf,
}

/// What was on disk at open.
pub(crate) struct Loaded {
    pub revision: u64,
    pub objects: Vec<(ObjectKey, Object)>,
}

impl Disk {
    pub(crate) fn open(state_dir: &Path) -> Result<(Disk, Loaded)> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::Io {
            path: state_dir.to_owned(),
            source,
        })?;
        let path = state_dir.join(FILE_NAME);
        // Every object also lives in memory (the store's map); redb's page
        // cache (1 GiB by default) would only hold a second copy.
        let db = Database::builder()
            .set_cache_size(PAGE_CACHE_BYTES)
            .create(&path)
            .map_err(storage("open database"))?;
        let disk = Disk { db, path };
        disk.ensure_tables()?;
        let loaded = disk.load()?;
        Ok((disk, loaded))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the tables on first open so that readers never meet a missing table.
    fn ensure_tables(&self) -> Result<()> {
        let txn = self.db.begin_write().map_err(storage("begin write"))?;
        txn.open_table(OBJECTS)
            .map_err(storage("open objects table"))?;
        txn.open_table(META).map_err(storage("open meta table"))?;
        txn.commit().map_err(storage("commit"))
    }

    fn load(&self) -> Result<Loaded> {
        let txn = self.db.begin_read().map_err(storage("begin read"))?;
        let meta = txn.open_table(META).map_err(storage("open meta table"))?;
        let revision = meta
            .get(REVISION)
            .map_err(storage("read revision"))?
            .map_or(0, |v| v.value());
        let table = txn
            .open_table(OBJECTS)
            .map_err(storage("open objects table"))?;
        let mut objects = Vec::new();
        for entry in table.iter().map_err(storage("iterate objects"))? {
            let (k, v) = entry.map_err(storage("read object"))?;
            let text = k.value();
            let key = ObjectKey::from_storage_key(text).ok_or_else(|| StoreError::Corrupt {
                key: text.to_owned(),
                reason: "unknown key format".into(),
            })?;
            let object = Object::from_json_bytes(key.kind(), v.value()).map_err(|e| {
                StoreError::Corrupt {
                    key: text.to_owned(),
                    reason: e.to_string(),
                }
            })?;
            objects.push((key, object));
        }
        Ok(Loaded { revision, objects })
    }

    /// Writes a batch and the new revision in one durable transaction.
    pub(crate) fn commit(&self, writes: &[Write<'_>], revision: u64) -> Result<()> {
        let txn = self.db.begin_write().map_err(storage("begin write"))?;
        {
            let mut table = txn
                .open_table(OBJECTS)
                .map_err(storage("open objects table"))?;
            for write in writes {
                match write {
                    Write::Put(key, object) => {
                        let bytes = object.to_json_bytes();
                        table
                            .insert(key.storage_key().as_str(), bytes.as_slice())
                            .map_err(storage("insert object"))?;
                    }
                    Write::Delete(key) => {
                        table
                            .remove(key.storage_key().as_str())
                            .map_err(storage("remove object"))?;
                    }
                }
            }
            let mut meta = txn.open_table(META).map_err(storage("open meta table"))?;
            meta.insert(REVISION, revision)
                .map_err(storage("write revision"))?;
        }
        txn.commit().map_err(storage("commit"))
    }
}
