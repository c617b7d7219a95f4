"""A tiny hand-made package (no exporter, no torch) for the runtime tests, plus its numpy reference.

Denoiser (onnx.helper graph, inputs x (B, C, 8, 8) float32, t (B,) float32 or int64, y (B,) int64):
    abar(t) ~ exp(-(0.1 s + 9.95 s^2)), s = t / 1000 (the linear schedule's alpha-bar, closed form)
    eps = sqrt(1 - abar) * x + 0.1 * tanh(x + E[y] + s * w)     ideal eps for N(0, I) data, perturbed
    var = tanh(0.5 * x + s)                                      learned-sigma channels in [-1, 1]
    out = concat(eps, var) (B, 2C, 8, 8), or eps alone without learned sigma.
A plausible denoiser keeps every scheduler's trajectory bounded, so ORT-vs-numpy rounding stays tiny.
VAE decoder: latent / scaling_factor -> 1x1 conv to 3 channels -> tanh -> nearest x2 -> (x + 1) / 2.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NUM_CLASSES = 10
LATENT_SIDE = 8
SCALING_FACTOR = 0.18215
OPSET = 17


@dataclass
class TinyModel:
    """Parameters of the fixture graphs and the numpy forward passes the tests compare against."""

    channels: int
    learn_sigma: bool
    label_table: np.ndarray  # (NUM_CLASSES + 1, C)
    time_weight: np.ndarray  # (C,)
    conv_weight: np.ndarray  # (3, C)
    conv_bias: np.ndarray  # (3,)

    @classmethod
    def create(cls, channels: int = 4, learn_sigma: bool = True, seed: int = 0) -> "TinyModel":
        rng = np.random.default_rng(seed)
        return cls(
            channels=channels,
            learn_sigma=learn_sigma,
            label_table=(rng.standard_normal((NUM_CLASSES + 1, channels)) * 0.8).astype(np.float32),
            time_weight=rng.standard_normal(channels).astype(np.float32),
            conv_weight=(rng.standard_normal((3, channels)) * 0.05).astype(np.float32),
            conv_bias=(rng.standard_normal(3) * 0.1).astype(np.float32),
        )

    def denoise(self, x: np.ndarray, t: np.ndarray | float, y: np.ndarray) -> np.ndarray:
        s = (np.broadcast_to(np.asarray(t, np.float32), (len(x),)) / np.float32(1000.0))[:, None, None, None]
        abar = np.exp(-(np.float32(0.1) * s + np.float32(9.95) * s * s))
        shift = self.label_table[y][:, :, None, None] + s * self.time_weight[None, :, None, None]
        eps = np.sqrt(np.float32(1.0) - abar) * x + np.float32(0.1) * np.tanh(x + shift)
        if not self.learn_sigma:
            return eps.astype(np.float32)
        return np.concatenate([eps, np.tanh(np.float32(0.5) * x + s)], axis=1).astype(np.float32)

    def decode(self, latent: np.ndarray) -> np.ndarray:
        z = latent / np.float32(SCALING_FACTOR)
        h = np.einsum("oc,nchw->nohw", self.conv_weight, z) + self.conv_bias[None, :, None, None]
        h = np.tanh(h).repeat(2, axis=2).repeat(2, axis=3)
        return (h * np.float32(0.5) + np.float32(0.5)).astype(np.float32)

    def denoiser_graph(self, timestep_dtype: str = "float32") -> onnx.ModelProto:
        c = self.channels
        out_channels = 2 * c if self.learn_sigma else c
        const = lambda name, value: numpy_helper.from_array(np.asarray(value, np.float32), name)
        initializers = [
            const("thousand", 1000.0), const("one", 1.0), const("k1", 0.1), const("k2", 9.95),
            const("tenth", 0.1),
            const("table", self.label_table), const("w", self.time_weight.reshape(1, c, 1, 1)),
            numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "col"),
            numpy_helper.from_array(np.array([-1, c, 1, 1], np.int64), "emb_shape"),
        ]  # fmt: skip
        t_input = "t" if timestep_dtype == "float32" else "t_float"
        nodes = []
        if timestep_dtype != "float32":
            nodes.append(helper.make_node("Cast", ["t"], ["t_float"], to=TensorProto.FLOAT))
        nodes += [
            helper.make_node("Div", [t_input, "thousand"], ["s_flat"]),
            helper.make_node("Reshape", ["s_flat", "col"], ["s"]),
            helper.make_node("Mul", ["s", "s"], ["s2"]),
            helper.make_node("Mul", ["s", "k1"], ["a1"]),
            helper.make_node("Mul", ["s2", "k2"], ["a2"]),
            helper.make_node("Add", ["a1", "a2"], ["a"]),
            helper.make_node("Neg", ["a"], ["neg_a"]),
            helper.make_node("Exp", ["neg_a"], ["abar"]),
            helper.make_node("Sub", ["one", "abar"], ["one_minus"]),
            helper.make_node("Sqrt", ["one_minus"], ["gain"]),
            helper.make_node("Mul", ["gain", "x"], ["ideal"]),
            helper.make_node("Gather", ["table", "y"], ["emb_flat"], axis=0),
            helper.make_node("Reshape", ["emb_flat", "emb_shape"], ["emb"]),
            helper.make_node("Mul", ["s", "w"], ["time_shift"]),
            helper.make_node("Add", ["emb", "time_shift"], ["shift"]),
            helper.make_node("Add", ["x", "shift"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["bend"]),
            helper.make_node("Mul", ["tenth", "bend"], ["bend_scaled"]),
            helper.make_node("Add", ["ideal", "bend_scaled"], ["eps" if self.learn_sigma else "out"]),
        ]
        if self.learn_sigma:
            initializers.append(const("half", 0.5))
            nodes += [
                helper.make_node("Mul", ["half", "x"], ["half_x"]),
                helper.make_node("Add", ["half_x", "s"], ["var_pre"]),
                helper.make_node("Tanh", ["var_pre"], ["var"]),
                helper.make_node("Concat", ["eps", "var"], ["out"], axis=1),
            ]
        dtype = TensorProto.FLOAT if timestep_dtype == "float32" else TensorProto.INT64
        graph = helper.make_graph(
            nodes,
            "tiny_denoiser",
            [
                helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", c, LATENT_SIDE, LATENT_SIDE]),
                helper.make_tensor_value_info("t", dtype, ["batch"]),
                helper.make_tensor_value_info("y", TensorProto.INT64, ["batch"]),
            ],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", out_channels, *[LATENT_SIDE] * 2])],
            initializers,
        )
        return _model(graph)

    def vae_graph(self) -> onnx.ModelProto:
        c = self.channels
        initializers = [
            numpy_helper.from_array(np.float32(SCALING_FACTOR), "sf"),
            numpy_helper.from_array(self.conv_weight.reshape(3, c, 1, 1), "conv_w"),
            numpy_helper.from_array(self.conv_bias, "conv_b"),
            numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
            numpy_helper.from_array(np.float32(0.5), "half"),
        ]
        nodes = [
            helper.make_node("Div", ["latent", "sf"], ["z"]),
            helper.make_node("Conv", ["z", "conv_w", "conv_b"], ["h"]),
            helper.make_node("Tanh", ["h"], ["h_tanh"]),
            helper.make_node("Resize", ["h_tanh", "", "scales"], ["up"], mode="nearest"),
            helper.make_node("Mul", ["up", "half"], ["up_half"]),
            helper.make_node("Add", ["up_half", "half"], ["image"]),
        ]
        side = 2 * LATENT_SIDE
        graph = helper.make_graph(
            nodes,
            "tiny_vae_decoder",
            [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["batch", c, LATENT_SIDE, LATENT_SIDE])],
            [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, side, side])],
            initializers,
        )
        return _model(graph)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_package(
    root: Path,
    *,
    learn_sigma: bool = True,
    pixel: bool = False,
    cfg_channels: int | str = 3,
    timestep_dtype: str = "float32",
    extra_precisions: tuple[str, ...] = (),
) -> tuple[Path, TinyModel]:
    """Write a schema-1 package into `root`; returns its path and the model it holds.

    `pixel` makes a pixel-space package (3 channels, no VAE). Each extra precision gets its own file
    holding a model with different label embeddings, so a test can tell which file was used.
    """
    root.mkdir(parents=True, exist_ok=True)
    model = TinyModel.create(channels=3 if pixel else 4, learn_sigma=learn_sigma)
    c, out_channels = model.channels, (2 if learn_sigma else 1) * model.channels
    inputs = [
        {"name": "x", "dtype": "float32", "shape": ["batch", c, LATENT_SIDE, LATENT_SIDE]},
        {"name": "t", "dtype": timestep_dtype, "shape": ["batch"]},
        {"name": "y", "dtype": "int64", "shape": ["batch"]},
    ]
    outputs = [{"name": "out", "dtype": "float32", "shape": ["batch", out_channels, LATENT_SIDE, LATENT_SIDE]}]
    precisions = {}
    for precision in ("fp32", *extra_precisions):
        variant = model if precision == "fp32" else TinyModel.create(c, learn_sigma, seed=len(precisions) + 1)
        name = "denoiser.onnx" if precision == "fp32" else f"denoiser.{precision}.onnx"
        onnx.save(variant.denoiser_graph(timestep_dtype), root / name)
        precisions[precision] = {"file": name, "sha256": _sha256(root / name), "inputs": inputs, "outputs": outputs}
    vae = None
    if not pixel:
        onnx.save(model.vae_graph(), root / "vae_decoder.onnx")
        vae = {
            "file": "vae_decoder.onnx",
            "sha256": _sha256(root / "vae_decoder.onnx"),
            "input": "latent",
            "output": "image",
            "scaling_factor": SCALING_FACTOR,
            "output_range": [0, 1],
        }
    image_side = LATENT_SIDE if pixel else 2 * LATENT_SIDE
    manifest = {
        "schema_version": 1,
        "model": {
            "name": "tiny_fixture", "config": {}, "family": "dit",
            "attention": {"kind": "full"}, "reparameterized": True,
        },
        "latent": {"channels": c, "height": LATENT_SIDE, "width": LATENT_SIDE},
        "image": {"channels": 3, "height": image_side, "width": image_side, "range": [0, 1]},
        "classes": {"num_classes": NUM_CLASSES, "null_label": NUM_CLASSES},
        "learn_sigma": learn_sigma,
        "diffusion": {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"},
        "cfg": {"channels": cfg_channels},
        "denoiser": {"precisions": precisions},
        "vae_decoder": vae,
        "custom_ops": [],
        "files": {path.name: _sha256(path) for path in sorted(root.glob("*.onnx"))},
        "exporter": {"dit_edge": "fixture", "opset": OPSET},
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root, model


def rewrite_manifest(package: Path, **changes) -> None:
    """Replace top-level manifest keys (None deletes one) to build broken packages."""
    manifest = json.loads((package / "manifest.json").read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    (package / "manifest.json").write_text(json.dumps(manifest))
