//! XDP attachments, and pinning their links on bpffs so the translation
//! stays attached while the agent restarts: a new agent loading with the same
//! pin folder swaps its freshly loaded program into every pinned link
//! (`bpf_link_update`, atomic per interface), so no packet ever meets an
//! interface without the program.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use aya::programs::{
    Xdp,
    links::{FdLink, PinnedLink},
    xdp::{XdpLink, XdpLinkId},
};

use crate::DataplaneError;

/// How the translation program is attached to one interface.
pub(crate) enum Attachment {
    /// Owned by the loaded program: detached when the data plane drops.
    Owned(XdpLinkId),
    /// Pinned at `path`: outlives the data plane until detached.
    Pinned { link: FdLink, path: PathBuf },
}

fn link_error(
    interface: &str,
    source: impl std::error::Error + Send + Sync + 'static,
) -> DataplaneError {
    DataplaneError::Link {
        interface: interface.to_owned(),
        source: Box::new(source),
    }
}

/// The pin file name of an attachment key: keys may hold `/` (`pod:ns/name`).
pub(crate) fn pin_name(key: &str) -> String {
    key.replace('%', "%25").replace('/', "%2F")
}

/// The attachment key a pin file name stands for.
fn key_of_pin(name: &str) -> String {
    name.replace("%2F", "/").replace("%25", "%")
}

/// Turns a fresh attachment into a pinned one at `dir/<key>` (`key` names
/// the attachment; it is the interface unless several namespaces share one
/// name).
pub(crate) fn pin(
    program: &mut Xdp,
    id: XdpLinkId,
    dir: &Path,
    interface: &str,
) -> Result<Attachment, DataplaneError> {
    let link = program
        .take_link(id)
        .map_err(|e| link_error(interface, e))?;
    let fd = FdLink::try_from(link).map_err(|e| link_error(interface, e))?;
    std::fs::create_dir_all(dir).map_err(|source| DataplaneError::PinDir {
        path: dir.to_owned(),
        source,
    })?;
    let path = dir.join(pin_name(interface));
    let pinned = fd.pin(&path).map_err(|e| link_error(interface, e))?;
    Ok(Attachment::Pinned {
        link: FdLink::from(pinned),
        path,
    })
}

/// Takes over every link pinned in `dir`, pointing it at `program`, keyed
/// by the key each was pinned under.
///
/// A link whose interface went away while no agent ran (a pod deleted by
/// hand) cannot be updated any more: its pin is removed and it is skipped,
/// rather than keeping the data plane from loading.
pub(crate) fn adopt(
    program: &mut Xdp,
    dir: &Path,
) -> Result<HashMap<String, Attachment>, DataplaneError> {
    let mut adopted = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(adopted);
    };
    for entry in entries.flatten() {
        let key = key_of_pin(&entry.file_name().to_string_lossy());
        let path = entry.path();
        match take_over(program, &path, &key) {
            Ok(link) => {
                adopted.insert(key, Attachment::Pinned { link, path });
            }
            Err(error) => {
                tracing::warn!(link = %key, error = %error, "dropping a pinned XDP link that cannot be taken over");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(adopted)
}

/// Points the link pinned at `path` at `program` (`bpf_link_update`).
fn take_over(program: &mut Xdp, path: &Path, key: &str) -> Result<FdLink, DataplaneError> {
    let pinned = PinnedLink::from_pin(path).map_err(|e| link_error(key, e))?;
    let xdp = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| link_error(key, e))?;
    let id = program
        .attach_to_link(xdp)
        .map_err(|e| link_error(key, e))?;
    let link = program.take_link(id).map_err(|e| link_error(key, e))?;
    FdLink::try_from(link).map_err(|e| link_error(key, e))
}

/// Ends an attachment: the program leaves the interface.
pub(crate) fn release(
    program: &mut Xdp,
    name: &'static str,
    attachment: Attachment,
    interface: &str,
) -> Result<(), DataplaneError> {
    match attachment {
        Attachment::Owned(id) => program
            .detach(id)
            .map_err(|source| DataplaneError::Program { name, source }),
        Attachment::Pinned { link, path } => {
            // The pin and our fd are the only holders; both go, so does the link.
            std::fs::remove_file(&path).map_err(|e| link_error(interface, e))?;
            drop(link);
            Ok(())
        }
    }
}
