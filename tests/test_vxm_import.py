"""Import of voxelmorph TF ``.h5`` models (VxmDense): the reader on small files written here in
voxelmorph's Keras 2 HDF5 layout, clear errors, the CLI, and parity with a real voxelmorph
model (``../shared`` fixtures; skipped without them)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from tfreg.errors import InputError
from tfreg_plugins.voxelmorph.vxm_h5 import build_model, read_h5, vxm_to_config

from tfreg_cli.main import cli

# A 2D VxmDense((16, 16), [[4, 8], [8, 8, 4]]): convolutions in graph order, with the names
# voxelmorph gives them and the kernel shapes of its U-Net (2 levels, skip concat, flow head).
ARGS = {"name": "vxm_dense", "reg_field": "preintegrated", "fill_value": None, "hyp_model": None,
        "input_model": None, "unet_half_res": False, "trg_feats": 1, "src_feats": 1,
        "use_probs": False, "bidir": False, "int_downsize": None, "int_resolution": 2,
        "svf_resolution": 1, "int_steps": 7, "nb_unet_conv_per_level": 1, "unet_feat_mult": 1,
        "nb_unet_levels": None, "nb_unet_features": [[4, 8], [8, 8, 4]], "inshape": [16, 16],
        "metadata": {}}
CONVS = [  # (voxelmorph layer, tfreg layer, kernel shape)
    ("vxm_dense_unet_enc_conv_0_0", "unet_enc_conv_0_0", (3, 3, 2, 4)),
    ("vxm_dense_unet_enc_conv_1_0", "unet_enc_conv_1_0", (3, 3, 4, 8)),
    ("vxm_dense_unet_dec_conv_1_0", "unet_dec_conv_1_0", (3, 3, 8, 8)),
    ("vxm_dense_unet_dec_conv_0_0", "unet_dec_conv_0_0", (3, 3, 16, 8)),      # 8 up + 8 skip
    ("vxm_dense_unet_dec_final_conv_0", "unet_dec_final_conv_0", (3, 3, 12, 4)),  # 8 up + 4
    ("vxm_dense_flow", "flow", (3, 3, 4, 2)),
]


def random_weights(seed: int = 0, convs=CONVS) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(name, rng.normal(0, 0.1, shape).astype("float32"),
             rng.normal(0, 0.1, shape[-1]).astype("float32")) for name, _, shape in convs]


def write_vxm_h5(path: Path, args: dict | None, weights, class_name: str = "VxmDense") -> Path:
    """Write `weights` [(layer, kernel, bias)] as Keras 2 does for voxelmorph's ``model.save``:
    constructor arguments in the ``model_config`` attribute, weights under ``model_weights`` with
    weightless layers (inputs, activations, pooling...) in between. ``args=None`` writes a
    weights-only file (``save_weights``: no config, layers at the root)."""
    with h5py.File(path, "w") as f:
        if args is not None:
            f.attrs["model_config"] = json.dumps({"class_name": class_name, "config": args})
            f.attrs["keras_version"] = "2.21.0"
            f.attrs["backend"] = "tensorflow"
            root = f.create_group("model_weights")
        else:
            root = f
        names = ["vxm_dense_source_input", "vxm_dense_target_input", "vxm_dense_unet_input_concat"]
        for name, _, _ in weights:
            names += [name, f"{name}_activation"]
        names += ["vxm_dense_flow_resize", "vxm_dense_flow_int", "vxm_dense_diffflow",
                  "vxm_dense_transformer"]
        root.attrs["layer_names"] = np.array([n.encode() for n in names])
        arrays = {name: (kernel, bias) for name, kernel, bias in weights}
        for name in names:
            group = root.create_group(name)
            if name in arrays:
                group.attrs["weight_names"] = np.array([f"{name}/kernel:0".encode(),
                                                        f"{name}/bias:0".encode()])
                group.create_dataset(f"{name}/kernel:0", data=arrays[name][0])
                group.create_dataset(f"{name}/bias:0", data=arrays[name][1])
            else:
                group.attrs["weight_names"] = np.array([], dtype="S1")
    return path


def constant_flow_weights(c) -> list:
    """Every kernel and bias zero except the flow bias `c`: the SVF is `c` everywhere."""
    weights = [(n, np.zeros(s, "float32"), np.zeros(s[-1], "float32")) for n, _, s in CONVS]
    weights[-1] = (weights[-1][0], weights[-1][1], np.asarray(c, "float32"))
    return weights


# ------------------------------------------------------------------------------------ reader
def test_weights_are_loaded_by_role(tmp_path):
    weights = random_weights()
    model, config, inshape = build_model(write_vxm_h5(tmp_path / "m.h5", ARGS, weights))
    assert inshape == (16, 16)
    assert config["model"]["enc_features"] == [4, 8]
    assert config["model"]["dec_features"] == [8, 8, 4]
    for (_, ours, _), (_, kernel, bias) in zip(CONVS, weights):
        layer = model.get_layer(ours)
        np.testing.assert_array_equal(layer.kernel.numpy(), kernel)
        np.testing.assert_array_equal(layer.bias.numpy(), bias)


def test_layer_names_in_the_file_do_not_matter(tmp_path):
    """Older voxelmorph versions name layers differently; the graph order decides."""
    weights = random_weights(1)
    renamed = [(f"conv2d_{i}", kernel, bias) for i, (_, kernel, bias) in enumerate(weights)]
    model, _, _ = build_model(write_vxm_h5(tmp_path / "m.h5", ARGS, renamed))
    for (_, ours, _), (_, kernel, _) in zip(CONVS, weights):
        np.testing.assert_array_equal(model.get_layer(ours).kernel.numpy(), kernel)


def test_imported_constant_flow_gives_that_displacement(tmp_path):
    """SVF c everywhere -> scaling and squaring keeps a constant field -> disp == c and
    warped(x) = moving(x + c), nearest border outside."""
    c = [1.0, -2.0]
    model, _, _ = build_model(write_vxm_h5(tmp_path / "m.h5", ARGS, constant_flow_weights(c)))
    moving = np.random.default_rng(2).random((1, 16, 16, 1)).astype("float32")
    out = model({"moving": moving, "fixed": moving})
    np.testing.assert_allclose(out["disp"], np.broadcast_to(c, (1, 16, 16, 2)), atol=1e-5)
    i, j = np.clip(np.arange(16) + 1, 0, 15), np.clip(np.arange(16) - 2, 0, 15)
    np.testing.assert_allclose(out["warped"], moving[:, i][:, :, j], atol=1e-5)


def test_weights_only_file_needs_the_arguments(tmp_path):
    path = write_vxm_h5(tmp_path / "w.h5", None, random_weights(3))
    vxm = read_h5(path)
    assert vxm.class_name is None and vxm.args == {} and len(vxm.layers) == 6
    with pytest.raises(InputError) as err:
        build_model(path)
    assert str(err.value) == (f"{path}: the file stores no VxmDense arguments (weights only); "
                              "give at least inshape, e.g. --arg inshape=[160,192,224]")
    model, _, _ = build_model(path, {"inshape": [16, 16], "nb_unet_features": [[4, 8], [8, 8, 4]]})
    np.testing.assert_array_equal(model.get_layer("flow").kernel.numpy(), random_weights(3)[-1][1])


@pytest.mark.parametrize("changes,model_section", [
    ({}, {"enc_features": [4, 8], "dec_features": [8, 8, 4], "conv_per_level": 1,
          "int_steps": 7, "int_resolution": 2, "svf_resolution": 1, "bidir": False}),
    # deprecated aliases: int_downsize wins over int_resolution, unet_half_res = svf_resolution 2
    ({"int_downsize": 4, "unet_half_res": True, "bidir": True, "int_steps": 5},
     {"int_resolution": 4, "svf_resolution": 2, "bidir": True, "int_steps": 5}),
    # voxelmorph's integer form: feats = round(4 * 2 ** [0, 1, 2]) = [4, 8, 16];
    # encoder = feats[:-1], decoder = reversed feats, each repeated per conv
    ({"nb_unet_features": 4, "nb_unet_levels": 3, "unet_feat_mult": 2},
     {"enc_features": [4, 8], "dec_features": [16, 8, 4]}),
    ({"nb_unet_features": 4, "nb_unet_levels": 3, "unet_feat_mult": 2,
      "nb_unet_conv_per_level": 2},
     {"enc_features": [4, 4, 8, 8], "dec_features": [16, 16, 8, 8, 4, 4], "conv_per_level": 2}),
    ({"nb_unet_features": None}, {"enc_features": [16, 32, 32, 32],
                                  "dec_features": [32, 32, 32, 32, 32, 16, 16]}),
    ({"fill_value": 0}, {"fill_value": 0.0}),
])
def test_arguments_map_to_the_tfreg_config(tmp_path, changes, model_section):
    path = write_vxm_h5(tmp_path / "m.h5", {**ARGS, **changes}, random_weights())
    mapped, inshape = vxm_to_config(read_h5(path))
    assert inshape == (16, 16)
    for key, value in model_section.items():
        assert mapped["model"][key] == value, key


@pytest.mark.parametrize("changes,class_name,message", [
    ({"use_probs": True}, "VxmDense", "VxmDense option use_probs=True is not supported by tfreg"),
    ({"src_feats": 2}, "VxmDense", "VxmDense option src_feats=2 is not supported by tfreg"),
    ({"hyp_model": {"class_name": "Functional"}}, "VxmDense", "VxmDense option hyp_model="),
    ({"some_new_option": 1}, "VxmDense", "VxmDense option 'some_new_option' is not supported by tfreg"),
    ({}, "HyperVxmDense", "voxelmorph model class 'HyperVxmDense' is not supported (tfreg imports VxmDense models)"),
    ({"inshape": [18, 18]}, "VxmDense", "cannot build the equivalent network: inshape: every size must divide by 4"),
])
def test_unsupported_options_are_named(tmp_path, changes, class_name, message):
    path = write_vxm_h5(tmp_path / "m.h5", {**ARGS, **changes}, random_weights(), class_name)
    with pytest.raises(InputError) as err:
        build_model(path)
    assert str(err.value).startswith(f"{path}: {message}"), str(err.value)
    assert "\n" not in str(err.value)


def test_weights_that_do_not_match_the_arguments(tmp_path):
    weights = random_weights()
    name, kernel, bias = weights[1]
    weights[1] = (name, np.zeros((3, 3, 4, 6), "float32"), np.zeros(6, "float32"))
    path = write_vxm_h5(tmp_path / "m.h5", ARGS, weights)
    with pytest.raises(InputError) as err:
        build_model(path)
    assert str(err.value) == (f"{path}: layer 'vxm_dense_unet_enc_conv_1_0' has kernel shape "
                              "(3, 3, 4, 6), expected (3, 3, 4, 8) for tfreg layer "
                              "'unet_enc_conv_1_0'")
    path = write_vxm_h5(tmp_path / "short.h5", ARGS, random_weights()[:-1])
    with pytest.raises(InputError, match="holds 5 convolution layers, but the VxmDense arguments "
                                         "describe 6"):
        build_model(path)


def test_files_that_are_not_voxelmorph_models(tmp_path):
    text = tmp_path / "model.h5"
    text.write_text("not hdf5")
    with pytest.raises(InputError) as err:
        read_h5(text)
    assert str(err.value) == f"{text}: not an HDF5 file (expected a Keras 2 .h5 model saved by voxelmorph)"
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w"):
        pass
    with pytest.raises(InputError, match="no Keras weights found"):
        read_h5(empty)
    with pytest.raises(InputError, match="no such file"):
        read_h5(tmp_path / "missing.h5")


# --------------------------------------------------------------------------------------- CLI
def test_cli_import_writes_a_model_directory(tmp_path):
    from tfreg.export import load_model

    path = write_vxm_h5(tmp_path / "m.h5", ARGS, constant_flow_weights([1.0, -2.0]))
    out = tmp_path / "model"
    result = CliRunner().invoke(cli, ["import-voxelmorph", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "tfreg_model.json").read_text())
    assert info["method"] == "voxelmorph" and info["inshape"] == [16, 16]
    assert info["preprocessing"]["normalize"] == "minmax"
    assert info["imported_from"]["keras_version"] == "2.21.0"
    loaded = load_model(out)   # the SavedModel, as `tfreg register --model` uses it
    moving = np.random.default_rng(5).random((16, 16)).astype("float32")
    warped, disp = loaded.register(moving, moving)
    np.testing.assert_allclose(disp, np.broadcast_to([1.0, -2.0], (16, 16, 2)), atol=1e-5)


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_text("x")
    runner = CliRunner()
    result = runner.invoke(cli, ["import-voxelmorph", str(bad), "-o", str(tmp_path / "m")])
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {bad}: not an HDF5 file (expected a Keras 2 .h5 "
                                     "model saved by voxelmorph)")
    path = write_vxm_h5(tmp_path / "w.h5", None, random_weights())
    result = runner.invoke(cli, ["import-voxelmorph", str(path), "-o", str(tmp_path / "m"),
                                 "--arg", "inshape"])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: --arg inshape: expected NAME=VALUE, e.g. "
                                     "inshape=[160,192,224]")


# ------------------------------------------------------------- parity with real voxelmorph
def _close(got, want, name):
    """rtol 1e-5, plus atol 1e-5 of the reference's largest magnitude (float32 sums)."""
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5,
                               atol=1e-5 * float(np.abs(want).max()), err_msg=name)


def test_parity_with_voxelmorph_model(vxm_fixtures):
    """The imported VxmDense((32,)*3, int_steps=7, int_resolution=2) reproduces voxelmorph's
    moved image, preint_flow (16^3 SVF) and pos_flow (full-resolution displacement); measured
    max abs errors ~2e-7 (values up to 0.6)."""
    model, config, inshape = build_model(vxm_fixtures / "vxmdense_diff_32.h5")
    assert inshape == (32, 32, 32) and config["model"]["int_steps"] == 7
    io = np.load(vxm_fixtures / "vxmdense_diff_32_io.npz", allow_pickle=False)
    out = model({"moving": io["moving"], "fixed": io["fixed"]})
    _close(out["warped"], io["moved"], "moved")
    _close(out["preint_flow"], io["preint_flow"], "preint_flow")
    _close(out["disp"], io["pos_flow"], "pos_flow")


def test_imported_model_registers_files(vxm_fixtures, tmp_path):
    """import-voxelmorph -> tfreg register on NIfTI files gives voxelmorph's pos_flow (no
    intensity normalisation, inputs already at the model's shape)."""
    io = np.load(vxm_fixtures / "vxmdense_diff_32_io.npz", allow_pickle=False)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    for name in ("fixed", "moving"):
        nib.save(nib.Nifti1Image(io[name][0, ..., 0], affine), tmp_path / f"{name}.nii.gz")
    runner = CliRunner()
    model_dir, out = tmp_path / "model", tmp_path / "out"
    result = runner.invoke(cli, ["import-voxelmorph", str(vxm_fixtures / "vxmdense_diff_32.h5"),
                                 "-o", str(model_dir), "--normalize", "none"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["register", str(tmp_path / "fixed.nii.gz"),
                                 str(tmp_path / "moving.nii.gz"), "--model", str(model_dir),
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    field = np.asarray(nib.load(out / "disp.nii.gz").dataobj)
    _close(field.reshape(32, 32, 32, 3), io["pos_flow"][0], "displacement")
