"""`dit-sample` writes the same images the Sampler returns, as a PNG grid; bad input exits non-zero."""

import numpy as np
import pytest
from typer.testing import CliRunner

from runtime import Sampler
from runtime.cli import app
from runtime.images import image_grid
from tests.runtime_fixtures import build_package
from tests.test_runtime_images import decode_png


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return build_package(tmp_path_factory.mktemp("cli"))[0]


@pytest.mark.parametrize("extra", [[], ["--low-memory"]])
def test_writes_a_grid_of_the_sampler_images(package, tmp_path, extra):
    out = tmp_path / "grid.png"
    args = [str(package), "--class-label", "1", "--class-label", "6", "--num-per-class", "2", "--steps", "4",
            "--scheduler", "dpm++2m", "--guidance-scale", "2.5", "--seed", "7", "--out", str(out), *extra]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote 4 images" in result.output
    expected = Sampler(package)([1, 1, 6, 6], steps=4, scheduler="dpm++2m", guidance_scale=2.5, seed=7)
    np.testing.assert_array_equal(decode_png(out.read_bytes()), image_grid(expected, columns=2))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--class-label", "1", "--scheduler", "lms"], "valid choices: ddpm, ddim, dpm++2m, euler"),
        (["--class-label", "12"], "valid labels are 0..9"),
        (["--class-label", "1", "--steps", "0"], "between 1 and num_train_timesteps=1000"),
        (["--class-label", "1", "--provider", "npu"], "valid choices: cpu, cuda, tensorrt"),
    ],
)
def test_bad_input_exits_with_a_message(package, tmp_path, args, message):
    result = CliRunner().invoke(app, [str(package), *args, "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "x.png").exists()
