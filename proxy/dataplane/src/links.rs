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

/// Turns a fresh attachment into a pinned one at `dir/<interface>`.
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
    let path = dir.join(interface);
    let pinned = fd.pin(&path).map_err(|e| link_error(interface, e))?;
    Ok(Attachment::Pinned {
        link: FdLink::from(pinned),
        path,
    })
}

/// Takes over every link pinned in `dir`, pointing it at `program`.
pub(crate) fn adopt(
    program: &mut Xdp,
    dir: &Path,
) -> Result<HashMap<String, Attachment>, DataplaneError> {
    let mut adopted = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(adopted);
    };
    for entry in entries.flatten() {
        let interface = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let pinned = PinnedLink::from_pin(&path).map_err(|e| link_error(&interface, e))?;
        let xdp = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| link_error(&interface, e))?;
        let id = program
            .attach_to_link(xdp)
            .map_err(|e| link_error(&interface, e))?;
        let link = program
            .take_link(id)
            .map_err(|e| link_error(&interface, e))?;
        let link = FdLink::try_from(link).map_err(|e| link_error(&interface, e))?;
        adopted.insert(interface, Attachment::Pinned { link, path });
    }
    Ok(adopted)
}

/// Ends an attachment: the program leaves the interface.
pub(crate) fn release(
    program: &mut Xdp,
    attachment: Attachment,
    interface: &str,
) -> Result<(), DataplaneError> {
    match attachment {
        Attachment::Owned(id) => program
            .detach(id)
            .map_err(|source| DataplaneError::Program {
                name: vipr_common::XDP_PROGRAM,
                source,
            }),
        Attachment::Pinned { link, path } => {
            // The pin and our fd are the only holders; both go, so does the link.
            std::fs::remove_file(&path).map_err(|e| link_error(interface, e))?;
            drop(link);
            Ok(())
        }
    }
}
