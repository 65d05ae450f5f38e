//! The `cpu` backend: real forward passes of the [`nets`](crate::nets) networks over a batch,
//! with ndarray (its GEMM is `matrixmultiply`, single-threaded: one worker thread is one
//! "GPU").
//!
//! Activations are matrices with one row per request (dense layers) or per pixel of every
//! request (convolutions, NHWC): a convolution is im2col then one GEMM with the `[9*cin, cout]`
//! weight matrix, so every FLOP of either network is a GEMM.

use std::sync::Arc;

use ndarray::{s, Array1, Array2, ArrayView2};

use crate::backend::{Backend, BatchOutput, ByModel, ModelSpec};
use crate::nets::{self, Conv, DecodedBatch, Dense, Network, Weights, RESNET_CHANNELS, RESNET_SIDE, RESNET_WIDTH};

#[derive(Debug)]
struct Layers {
    network: Network,
    convs: Vec<(Array2<f32>, Array1<f32>)>,
    dense: Vec<(Array2<f32>, Array1<f32>)>,
}

impl Layers {
    fn of(weights: &Weights) -> Layers {
        let conv = |c: &Conv| {
            (
                Array2::from_shape_vec((9 * c.cin, c.cout), c.w.clone()).expect("conv shape"),
                Array1::from(c.b.clone()),
            )
        };
        let dense = |d: &Dense| {
            (
                Array2::from_shape_vec((d.inputs, d.outputs), d.w.clone()).expect("dense shape"),
                Array1::from(d.b.clone()),
            )
        };
        Layers {
            network: weights.network,
            convs: weights.convs.iter().map(conv).collect(),
            dense: weights.dense.iter().map(dense).collect(),
        }
    }
}

fn relu(x: &mut Array2<f32>) {
    x.mapv_inplace(|v| v.max(0.0));
}

fn affine(x: ArrayView2<'_, f32>, (w, b): &(Array2<f32>, Array1<f32>)) -> Array2<f32> {
    let mut y = x.dot(w);
    y += b;
    y
}

/// A 3×3 convolution (stride 1, zero padding 1) of `batch` images in NHWC rows
/// (`[batch * side * side, cin]`) into `[batch * side * side, cout]`.
fn conv3x3(x: &Array2<f32>, batch: usize, side: usize, layer: &(Array2<f32>, Array1<f32>)) -> Array2<f32> {
    let cin = x.ncols();
    let mut cols = Array2::<f32>::zeros((batch * side * side, 9 * cin));
    for n in 0..batch {
        for y in 0..side {
            for x_ in 0..side {
                let row = (n * side + y) * side + x_;
                for ky in 0..3 {
                    let sy = y as isize + ky as isize - 1;
                    if sy < 0 || sy >= side as isize {
                        continue;
                    }
                    for kx in 0..3 {
                        let sx = x_ as isize + kx as isize - 1;
                        if sx < 0 || sx >= side as isize {
                            continue;
                        }
                        let src = (n * side + sy as usize) * side + sx as usize;
                        let offset = (ky * 3 + kx) * cin;
                        cols.slice_mut(s![row, offset..offset + cin]).assign(&x.row(src));
                    }
                }
            }
        }
    }
    affine(cols.view(), layer)
}

/// The forward pass of `batch` inputs (`f32`, one request after another) into `[batch, 10]`.
fn forward(layers: &Layers, inputs: &[f32], batch: usize) -> Array2<f32> {
    match layers.network {
        Network::Mlp => {
            let mut x = ArrayView2::from_shape((batch, nets::MLP_INPUT), inputs)
                .expect("inputs checked")
                .to_owned();
            for (index, layer) in layers.dense.iter().enumerate() {
                x = affine(x.view(), layer);
                if index + 1 < layers.dense.len() {
                    relu(&mut x);
                }
            }
            x
        }
        Network::ResNet => {
            let side = RESNET_SIDE;
            let pixels = side * side;
            // CHW per request into NHWC rows.
            let mut x = Array2::<f32>::zeros((batch * pixels, RESNET_CHANNELS));
            for n in 0..batch {
                let image = &inputs[n * RESNET_CHANNELS * pixels..(n + 1) * RESNET_CHANNELS * pixels];
                for c in 0..RESNET_CHANNELS {
                    for p in 0..pixels {
                        x[[n * pixels + p, c]] = image[c * pixels + p];
                    }
                }
            }
            let mut h = conv3x3(&x, batch, side, &layers.convs[0]);
            relu(&mut h);
            for block in layers.convs[1..].chunks(2) {
                let mut inner = conv3x3(&h, batch, side, &block[0]);
                relu(&mut inner);
                let mut out = conv3x3(&inner, batch, side, &block[1]);
                out += &h;
                relu(&mut out);
                h = out;
            }
            // Global average pooling per image.
            let mut pooled = Array2::<f32>::zeros((batch, RESNET_WIDTH));
            for n in 0..batch {
                let rows = h.slice(s![n * pixels..(n + 1) * pixels, ..]);
                pooled
                    .row_mut(n)
                    .assign(&rows.mean_axis(ndarray::Axis(0)).expect("pixels"));
            }
            affine(pooled.view(), &layers.dense[0])
        }
    }
}

/// Runs `model`'s network on the CPU.
#[derive(Debug)]
pub struct CpuBackend {
    models: ByModel<Arc<Layers>>,
    batch: DecodedBatch,
}

impl CpuBackend {
    /// A backend for every model a network runs; an error names the models it cannot run.
    pub fn new(models: &[ModelSpec]) -> Result<CpuBackend, String> {
        let models = ByModel::build("cpu", models, |m| {
            Ok(Weights::for_model(&m.name).map(|weights| Arc::new(Layers::of(&weights))))
        })?;
        Ok(CpuBackend {
            models,
            batch: DecodedBatch::default(),
        })
    }

    /// A backend for one network (the profiler and tests), as model id 0.
    pub fn of_weights(weights: &Weights) -> CpuBackend {
        CpuBackend {
            models: ByModel::single(Arc::new(Layers::of(weights))),
            batch: DecodedBatch::default(),
        }
    }
}

impl Backend for CpuBackend {
    fn run(&mut self, model: u32, inputs: &[&[u8]], out: &mut BatchOutput) -> Result<(), String> {
        let layers = self.models.get(model)?;
        self.batch.decode(layers.network, inputs);
        let logits = if self.batch.is_empty() {
            Array2::zeros((0, nets::OUTPUTS))
        } else {
            forward(layers, &self.batch.values, self.batch.len())
        };
        let logits = logits.as_slice().expect("a fresh array is contiguous");
        self.batch.answer(layers.network, inputs, logits, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same networks computed the plain way, in f64, from the same weights.
    fn reference(weights: &Weights, input: &[f32]) -> Vec<f64> {
        let dense = |d: &Dense, x: &[f64]| -> Vec<f64> {
            (0..d.outputs)
                .map(|o| {
                    f64::from(d.b[o])
                        + (0..d.inputs)
                            .map(|i| x[i] * f64::from(d.w[i * d.outputs + o]))
                            .sum::<f64>()
                })
                .collect()
        };
        let relu = |v: Vec<f64>| v.into_iter().map(|x| x.max(0.0)).collect::<Vec<_>>();
        match weights.network {
            Network::Mlp => {
                let x: Vec<f64> = input.iter().map(|&v| f64::from(v)).collect();
                let h = relu(dense(&weights.dense[0], &x));
                let h = relu(dense(&weights.dense[1], &h));
                dense(&weights.dense[2], &h)
            }
            Network::ResNet => {
                let side = RESNET_SIDE;
                // CHW images in f64.
                let conv = |c: &Conv, x: &[f64]| -> Vec<f64> {
                    let mut y = vec![0.0; c.cout * side * side];
                    for k in 0..c.cout {
                        for py in 0..side {
                            for px in 0..side {
                                let mut acc = f64::from(c.b[k]);
                                for ch in 0..c.cin {
                                    for ky in 0..3 {
                                        for kx in 0..3 {
                                            let (sy, sx) =
                                                (py as isize + ky as isize - 1, px as isize + kx as isize - 1);
                                            if sy >= 0 && sx >= 0 && (sy as usize) < side && (sx as usize) < side {
                                                acc += x[(ch * side + sy as usize) * side + sx as usize]
                                                    * f64::from(c.weight(ky, kx, ch, k));
                                            }
                                        }
                                    }
                                }
                                y[(k * side + py) * side + px] = acc;
                            }
                        }
                    }
                    y
                };
                let x: Vec<f64> = input.iter().map(|&v| f64::from(v)).collect();
                let mut h = relu(conv(&weights.convs[0], &x));
                for block in weights.convs[1..].chunks(2) {
                    let inner = relu(conv(&block[0], &h));
                    let out = conv(&block[1], &inner);
                    h = relu(out.iter().zip(&h).map(|(a, b)| a + b).collect());
                }
                let pooled: Vec<f64> = (0..RESNET_WIDTH)
                    .map(|k| h[k * side * side..(k + 1) * side * side].iter().sum::<f64>() / (side * side) as f64)
                    .collect();
                dense(&weights.dense[0], &pooled)
            }
        }
    }

    fn decode(bytes: &[u8]) -> Vec<f32> {
        let mut values = Vec::new();
        for c in bytes.chunks_exact(4) {
            values.push(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        }
        values
    }

    #[test]
    fn cpu_numerics_match_an_f64_reference_for_several_batch_sizes() {
        for network in Network::ALL {
            let weights = Weights::from_seed(network, 7);
            let mut backend = CpuBackend::of_weights(&weights);
            for batch in [1usize, 3, 8] {
                let inputs: Vec<Vec<u8>> = (0..batch).map(|i| nets::sample_input(network, i as u64)).collect();
                let views: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
                let mut out = BatchOutput::default();
                backend.run(0, &views, &mut out).unwrap();
                assert!(out.refused.is_empty());
                assert_eq!(out.lens, vec![40; batch]);
                for (i, input) in inputs.iter().enumerate() {
                    let got = decode(&out.outputs[i * 40..(i + 1) * 40]);
                    let want = reference(&weights, &decode(input));
                    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
                    for (g, w) in got.iter().zip(&want) {
                        let error = (f64::from(*g) - w).abs() / scale;
                        assert!(error < 1e-4, "{network:?} batch {batch}: {g} vs {w} (rel {error:e})");
                    }
                    // Not a degenerate network: the logits differ from each other.
                    assert!(want.iter().any(|v| (v - want[0]).abs() > 1e-3 * scale));
                }
            }
        }
    }

    #[test]
    fn a_wrong_input_is_refused_and_the_rest_of_the_batch_runs() {
        let weights = Weights::from_seed(Network::Mlp, 1);
        let mut backend = CpuBackend::of_weights(&weights);
        let good = nets::sample_input(Network::Mlp, 3);
        let mut out = BatchOutput::default();
        backend
            .run(0, &[good.as_slice(), b"short".as_slice(), good.as_slice()], &mut out)
            .unwrap();
        assert_eq!(out.refused, [1]);
        assert_eq!(out.lens, [40, 0, 40]);
        assert_eq!(out.outputs[..40], out.outputs[40..]);
        assert!(out.message.contains("1024 bytes"), "{}", out.message);
        // A batch of only wrong inputs runs nothing and refuses all.
        out.clear();
        backend.run(0, &[b"".as_slice()], &mut out).unwrap();
        assert_eq!(
            (out.refused.as_slice(), out.lens.as_slice()),
            ([0].as_slice(), [0].as_slice())
        );
    }

    #[test]
    fn models_map_to_networks_by_name() {
        assert_eq!(Network::for_model("mlp"), Some(Network::Mlp));
        assert_eq!(Network::for_model("resnet_b"), Some(Network::ResNet));
        assert_eq!(Network::for_model("mlpx"), None);
        let spec = |id, name: &str| ModelSpec {
            id,
            name: name.to_string(),
            slo_ns: 1,
            profile: symphony_core::profile::Profile::from_latencies_ns(vec![1], 0, 0),
        };
        assert!(CpuBackend::new(&[spec(0, "mlp"), spec(1, "resnet-a")]).is_ok());
        let error = CpuBackend::new(&[spec(0, "mlp"), spec(1, "bert")]).unwrap_err();
        assert!(error.contains("bert"), "{error}");
        // Different names, different weights.
        assert_ne!(Weights::for_model("mlp-a"), Weights::for_model("mlp-b"));
    }
}
