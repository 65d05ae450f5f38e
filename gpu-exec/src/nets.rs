//! The networks the `cpu` and `cuda` backends run, and their weights.
//!
//! Two shapes with very different costs, weights drawn from a seed (nothing is downloaded):
//!
//! - `mlp`: 256 → 512 → 512 → 10, ReLU after each hidden layer (about 0.8 MFLOP a request).
//! - `resnet`: a ResNet-style stack on a 3×32×32 image: a 3×3 convolution to 16 channels and
//!   ReLU, then 2 residual blocks (3×3 conv, ReLU, 3×3 conv, add the block's input, ReLU),
//!   global average pooling and a dense layer to 10 (about 20 MFLOP a request).
//!
//! # Tensor layout of requests and replies
//!
//! A request's input is the network's input as little-endian `f32`, nothing else: `mlp` 256
//! values (1024 bytes); `resnet` an image in CHW order, 3 × 32 × 32 values (12288 bytes). A
//! reply's output is 10 little-endian `f32` (40 bytes): the logits. An input of another length
//! is refused (the request is answered `malformed`; the rest of its batch runs).
//!
//! A scheduler model runs on a network when its name is the network's name or starts with it
//! and `-` or `_` (`mlp`, `mlp-small`, `resnet_b`); each model's weights come from a seed
//! derived from its name, so two models of one network compute different functions.

use rand::{Rng, SeedableRng};

use crate::backend::BatchOutput;

pub const MLP_INPUT: usize = 256;
pub const MLP_HIDDEN: usize = 512;
pub const OUTPUTS: usize = 10;
pub const RESNET_CHANNELS: usize = 3;
pub const RESNET_SIDE: usize = 32;
pub const RESNET_WIDTH: usize = 16;
pub const RESNET_BLOCKS: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    Mlp,
    ResNet,
}

impl Network {
    pub const ALL: [Network; 2] = [Network::Mlp, Network::ResNet];

    pub fn name(self) -> &'static str {
        match self {
            Network::Mlp => "mlp",
            Network::ResNet => "resnet",
        }
    }

    /// The network a scheduler model named `model` runs on, if any.
    pub fn for_model(model: &str) -> Option<Network> {
        Network::ALL.into_iter().find(|network| {
            let name = network.name();
            model == name
                || model
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('-') || rest.starts_with('_'))
        })
    }

    /// One request's input tensor: FP32 of this shape (what the KServe front ends declare
    /// for a model that runs on this network); the output is FP32 `[OUTPUTS]`.
    pub fn input_shape(self) -> Vec<i64> {
        match self {
            Network::Mlp => vec![MLP_INPUT as i64],
            Network::ResNet => vec![RESNET_CHANNELS as i64, RESNET_SIDE as i64, RESNET_SIDE as i64],
        }
    }

    /// `f32` values of one request's input.
    pub fn input_len(self) -> usize {
        match self {
            Network::Mlp => MLP_INPUT,
            Network::ResNet => RESNET_CHANNELS * RESNET_SIDE * RESNET_SIDE,
        }
    }
}

/// A dense layer: `y = x · w + b`, `w` row-major `[inputs, outputs]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dense {
    pub inputs: usize,
    pub outputs: usize,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

/// A 3×3 convolution, stride 1, zero padding 1: `w` row-major `[9 * cin, cout]`, rows in
/// `(ky, kx, cin)` order (the im2col order).
#[derive(Debug, Clone, PartialEq)]
pub struct Conv {
    pub cin: usize,
    pub cout: usize,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

impl Conv {
    /// The weight from input channel `c` at kernel offset `(ky, kx)` to output channel `k`.
    pub fn weight(&self, ky: usize, kx: usize, c: usize, k: usize) -> f32 {
        self.w[((ky * 3 + kx) * self.cin + c) * self.cout + k]
    }
}

/// One model's weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    pub network: Network,
    /// `resnet`: the stem, then two per block.
    pub convs: Vec<Conv>,
    /// `mlp`: three layers; `resnet`: the head.
    pub dense: Vec<Dense>,
}

fn uniform(rng: &mut rand_pcg::Pcg64, len: usize, bound: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-bound..bound)).collect()
}

fn dense(rng: &mut rand_pcg::Pcg64, inputs: usize, outputs: usize) -> Dense {
    // He-style scale keeps activations of order 1 through the stack.
    let bound = (6.0 / inputs as f32).sqrt();
    Dense {
        inputs,
        outputs,
        w: uniform(rng, inputs * outputs, bound),
        b: uniform(rng, outputs, 0.1),
    }
}

fn conv(rng: &mut rand_pcg::Pcg64, cin: usize, cout: usize, scale: f32) -> Conv {
    let bound = scale * (6.0 / (9 * cin) as f32).sqrt();
    Conv {
        cin,
        cout,
        w: uniform(rng, 9 * cin * cout, bound),
        b: uniform(rng, cout, 0.1),
    }
}

/// A seed from a model name (FNV-1a), so each model has its own weights.
pub fn seed_of(model: &str) -> u64 {
    model.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Weights {
    pub fn from_seed(network: Network, seed: u64) -> Weights {
        let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
        match network {
            Network::Mlp => Weights {
                network,
                convs: Vec::new(),
                dense: vec![
                    dense(&mut rng, MLP_INPUT, MLP_HIDDEN),
                    dense(&mut rng, MLP_HIDDEN, MLP_HIDDEN),
                    dense(&mut rng, MLP_HIDDEN, OUTPUTS),
                ],
            },
            Network::ResNet => {
                let mut convs = vec![conv(&mut rng, RESNET_CHANNELS, RESNET_WIDTH, 1.0)];
                for _ in 0..RESNET_BLOCKS {
                    convs.push(conv(&mut rng, RESNET_WIDTH, RESNET_WIDTH, 1.0));
                    // The second conv of a block starts small, as residual nets are set up.
                    convs.push(conv(&mut rng, RESNET_WIDTH, RESNET_WIDTH, 0.5));
                }
                Weights {
                    network,
                    convs,
                    dense: vec![dense(&mut rng, RESNET_WIDTH, OUTPUTS)],
                }
            }
        }
    }

    /// The weights of scheduler model `model`, if a network runs it.
    pub fn for_model(model: &str) -> Option<Weights> {
        Network::for_model(model).map(|network| Weights::from_seed(network, seed_of(model)))
    }
}

/// A batch's inputs as the networks take them: the valid ones decoded back to back.
#[derive(Debug, Default)]
pub struct DecodedBatch {
    /// The valid inputs' `f32`s, one request after another.
    pub values: Vec<f32>,
    /// Their indexes in the batch.
    valid: Vec<usize>,
    /// One output's bytes (reused).
    bytes: Vec<u8>,
}

impl DecodedBatch {
    /// Decodes `inputs` for `network`; an input of the wrong length is left out.
    pub fn decode(&mut self, network: Network, inputs: &[&[u8]]) {
        self.values.clear();
        self.valid.clear();
        for (index, bytes) in inputs.iter().enumerate() {
            if bytes.len() == network.input_len() * 4 {
                self.values.extend(
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
                self.valid.push(index);
            }
        }
    }

    /// Valid inputs (the batch the network runs).
    pub fn len(&self) -> usize {
        self.valid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.valid.is_empty()
    }

    /// Answers every request in order: the `i`-th valid one gets `logits[i * OUTPUTS..]` as
    /// little-endian `f32`, the others a refusal.
    pub fn answer(&mut self, network: Network, inputs: &[&[u8]], logits: &[f32], out: &mut BatchOutput) {
        let mut next_valid = 0;
        for (index, input) in inputs.iter().enumerate() {
            if self.valid.get(next_valid) == Some(&index) {
                self.bytes.clear();
                for v in &logits[next_valid * OUTPUTS..(next_valid + 1) * OUTPUTS] {
                    self.bytes.extend_from_slice(&v.to_le_bytes());
                }
                out.push(&self.bytes);
                next_valid += 1;
            } else {
                out.refuse(|| {
                    format!(
                        "model input is {} little-endian f32 ({} bytes), got {} bytes",
                        network.input_len(),
                        network.input_len() * 4,
                        input.len()
                    )
                });
            }
        }
    }
}

/// A deterministic input for `network` (tests, the profiler, load generation).
pub fn sample_input(network: Network, seed: u64) -> Vec<u8> {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let mut bytes = Vec::with_capacity(network.input_len() * 4);
    for _ in 0..network.input_len() {
        bytes.extend_from_slice(&rng.random_range(-1.0f32..1.0).to_le_bytes());
    }
    bytes
}
