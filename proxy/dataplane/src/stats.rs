//! The data plane's per-CPU counters, summed across CPUs.

use aya::maps::PerCpuArray;
use vipr_common::{Counter, CounterValue, map_names};

use crate::{Dataplane, DataplaneError};

/// Packet and byte totals per counter, summed over all CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    values: Vec<CounterValue>,
}

impl Counters {
    pub fn packets(&self, counter: Counter) -> u64 {
        self.get(counter).packets
    }

    pub fn bytes(&self, counter: Counter) -> u64 {
        self.get(counter).bytes
    }

    fn get(&self, counter: Counter) -> CounterValue {
        self.values
            .get(counter as usize)
            .copied()
            .unwrap_or_default()
    }

    /// Every counter with its packet and byte totals, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (Counter, CounterValue)> + '_ {
        Counter::ALL.iter().map(|c| (*c, self.get(*c)))
    }
}

impl Dataplane {
    /// Reads the counters now.
    pub fn counters(&self) -> Result<Counters, DataplaneError> {
        let map = self
            .ebpf()
            .map(map_names::STATS)
            .ok_or(DataplaneError::MissingMap(map_names::STATS))?;
        let array: PerCpuArray<_, CounterValue> =
            PerCpuArray::try_from(map).map_err(DataplaneError::map(map_names::STATS))?;
        let mut values = Vec::with_capacity(Counter::COUNT as usize);
        for index in 0..Counter::COUNT {
            let per_cpu = array
                .get(&index, 0)
                .map_err(DataplaneError::map(map_names::STATS))?;
            values.push(
                per_cpu
                    .iter()
                    .fold(CounterValue::default(), |acc, v| CounterValue {
                        packets: acc.packets + v.packets,
                        bytes: acc.bytes + v.bytes,
                    }),
            );
        }
        Ok(Counters { values })
    }
}
