//! The models every shard knows: by id and name, who owns each, and the MODELS answer.

use std::collections::HashMap;

use symphony_core::policy::ModelConfig;
use symphony_core::wire;

use crate::tensors::ModelTensors;

/// One model as every shard knows it.
#[derive(Debug)]
pub struct CatalogEntry {
    pub slo_ns: u64,
    pub owner: usize,
    /// Index in the owner's scheduler.
    pub local: u32,
    /// The size every input must have, if the model declares one.
    pub input_bytes: Option<u32>,
}

/// Read-only after start-up: the models by id and name, and who owns each.
#[derive(Debug)]
pub struct Catalog {
    pub models: Vec<CatalogEntry>,
    /// Seeded at random (`foldhash`): a client cannot pick names that collide.
    by_name: HashMap<String, u32, foldhash::fast::RandomState>,
    /// Per shard: the global ids of the models it owns, in local order.
    pub owned: Vec<Vec<u32>>,
    /// The models as configured (what executors are told at the handshake).
    pub configs: Vec<ModelConfig>,
    /// Per model: its declared tensors (the KServe v2 front end's).
    pub tensors: Vec<ModelTensors>,
}

impl Catalog {
    pub fn new(models: &[ModelConfig], input_bytes: &[Option<u32>], shards: usize) -> Catalog {
        let mut owned = vec![Vec::new(); shards];
        let mut by_name = HashMap::with_capacity_and_hasher(models.len(), foldhash::fast::RandomState::default());
        let mut entries = Vec::with_capacity(models.len());
        for (index, m) in models.iter().enumerate() {
            // A stable placement: model i on shard i mod n.
            let owner = index % shards;
            owned[owner].push(index as u32);
            by_name.insert(m.name.clone(), index as u32);
            entries.push(CatalogEntry {
                slo_ns: m.slo_ns,
                owner,
                local: owned[owner].len() as u32 - 1,
                input_bytes: input_bytes.get(index).copied().flatten(),
            });
        }
        Catalog {
            tensors: entries
                .iter()
                .map(|e| ModelTensors::default_for(e.input_bytes))
                .collect(),
            models: entries,
            by_name,
            owned,
            configs: models.to_vec(),
        }
    }

    /// The same, with the models' declared tensors (`tensors[i]` for model `i`; a model
    /// past the list keeps its defaults).
    pub fn with_tensors(mut self, tensors: &[ModelTensors]) -> Catalog {
        for (into, declared) in self.tensors.iter_mut().zip(tensors) {
            into.clone_from(declared);
        }
        self
    }

    pub fn lookup(&self, model: &wire::ArchivedModelRef) -> Option<u32> {
        match model {
            wire::ArchivedModelRef::Id(id) => {
                let id = id.to_native();
                ((id as usize) < self.models.len()).then_some(id)
            }
            wire::ArchivedModelRef::Name(name) => self.by_name.get(name.as_str()).copied(),
        }
    }

    /// The model named `name`.
    pub fn index_of(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// The MODELS answer.
    pub fn models_answer(&self, client_request_id: u64) -> wire::Models {
        wire::Models {
            client_request_id,
            models: self
                .configs
                .iter()
                .zip(&self.models)
                .enumerate()
                .map(|(id, (config, entry))| wire::ModelEntry {
                    id: id as u32,
                    name: config.name.clone(),
                    slo_us: config.slo_ns / 1000,
                    input_bytes: entry.input_bytes,
                    batch_size_max: config.profile.batch_size_max(),
                })
                .collect(),
        }
    }
}
