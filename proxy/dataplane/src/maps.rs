//! Typed access to the object's hash maps by name: the one place that turns
//! a missing map or a wrong key/value layout into a [`DataplaneError`].

use aya::{
    Ebpf, Pod,
    maps::{HashMap as BpfHashMap, MapData},
};

use crate::DataplaneError;

/// Hash map `name`, for reading.
pub(crate) fn hash_map<'a, K: Pod, V: Pod>(
    ebpf: &'a Ebpf,
    name: &'static str,
) -> Result<BpfHashMap<&'a MapData, K, V>, DataplaneError> {
    let map = ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
    BpfHashMap::try_from(map).map_err(DataplaneError::map(name))
}

/// Hash map `name`, for writing.
pub(crate) fn hash_map_mut<'a, K: Pod, V: Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<BpfHashMap<&'a mut MapData, K, V>, DataplaneError> {
    let map = ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
    BpfHashMap::try_from(map).map_err(DataplaneError::map(name))
}
