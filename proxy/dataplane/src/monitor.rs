//! The monitor's side of the data plane: switching events on and off (the
//! `MONITOR` flags), reading them from the `MONITOR_EVENTS` ring buffer and
//! the count of events the ring had no room for.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use vipr_common::{MonitorEvent, map_names};

use crate::{Dataplane, DataplaneError};

/// The event ring, taken out of the data plane by its one reader.
/// Poll its fd for readability, then [`MonitorEvents::drain`].
pub struct MonitorEvents {
    ring: RingBuf<MapData>,
}

impl MonitorEvents {
    /// Hands every event waiting in the ring to `each`; returns how many.
    pub fn drain(&mut self, mut each: impl FnMut(MonitorEvent)) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            if item.len() >= std::mem::size_of::<MonitorEvent>() {
                // SAFETY: the data plane writes whole MonitorEvents (plain
                // data, valid for any bit pattern); read unaligned.
                each(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<MonitorEvent>()) });
                n += 1;
            }
        }
        n
    }
}

impl AsFd for MonitorEvents {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl AsRawFd for MonitorEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

impl Dataplane {
    /// Takes the event ring (once: it has one reader). `None` afterwards.
    pub fn take_monitor_events(&mut self) -> Option<MonitorEvents> {
        let map = self.ebpf_mut().take_map(map_names::MONITOR_EVENTS)?;
        RingBuf::try_from(map)
            .ok()
            .map(|ring| MonitorEvents { ring })
    }

    /// Which events the data plane emits ([`crate::monitor_flags`] bits);
    /// zero while no monitor listens.
    pub fn set_monitor_flags(&mut self, flags: u32) -> Result<(), DataplaneError> {
        let map = self
            .ebpf_mut()
            .map_mut(map_names::MONITOR)
            .ok_or(DataplaneError::MissingMap(map_names::MONITOR))?;
        let mut array: Array<&mut MapData, u32> =
            Array::try_from(map).map_err(DataplaneError::map(map_names::MONITOR))?;
        array
            .set(0, flags, 0)
            .map_err(DataplaneError::map(map_names::MONITOR))
    }

    /// Events the ring had no room for since the data plane was loaded.
    pub fn monitor_lost(&self) -> Result<u64, DataplaneError> {
        let map = self
            .ebpf()
            .map(map_names::MONITOR_LOST)
            .ok_or(DataplaneError::MissingMap(map_names::MONITOR_LOST))?;
        let array: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(DataplaneError::map(map_names::MONITOR_LOST))?;
        let values = array
            .get(&0, 0)
            .map_err(DataplaneError::map(map_names::MONITOR_LOST))?;
        Ok(values.iter().sum())
    }
}
