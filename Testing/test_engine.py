"""How the engine runs the network: memory layout and torch.compile change speed, never results."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from conftest import random_tiny_model

from MedDiffFMLib import resources
from MedDiffFMLib.anatomy import BODY_LABEL, UNKNOWN_LABEL
from MedDiffFMLib.diffusion.sliding_window import Conditions
from MedDiffFMLib.errors import InputError
from MedDiffFMLib.model import weights
from MedDiffFMLib.model.weights import ModelCard
from MedDiffFMLib.tasks import Engine
from MedDiffFMLib.tasks.engine import EngineOptions, build_engine

SHAPE = (16, 24, 20)
CLOSE = dict(rtol=1e-3, atol=1e-4)  # float32 summation order differs between layouts and kernels


def conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [parameter for parameter in model.parameters() if parameter.dim() == 5]


def noise_estimate(engine: Engine, x: torch.Tensor) -> torch.Tensor:
    anatomy = torch.randint(0, 120, SHAPE, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return engine.predictor(Conditions(3, anatomy), SHAPE)(x, 100)


def test_channels_last_weights_give_the_contiguous_result():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    contiguous = Engine(random_tiny_model(), device="cpu", memory_format="contiguous", precision="fp32")
    channels_last = Engine(random_tiny_model(), device="cpu", memory_format="channels_last", precision="fp32")
    assert all(w.is_contiguous() for w in conv_weights(contiguous.model))
    weights = conv_weights(channels_last.model)
    assert all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in weights)
    assert sum(not w.is_contiguous() for w in weights) > len(weights) // 2
    expected = noise_estimate(contiguous, x)
    assert expected.abs().mean() > 1e-3
    torch.testing.assert_close(noise_estimate(channels_last, x), expected, **CLOSE)


def test_auto_memory_format_is_channels_last_on_the_cpu():
    assert Engine(random_tiny_model(), device="cpu").torch_memory_format == torch.channels_last_3d
    with pytest.raises(InputError, match="memory format"):
        Engine(random_tiny_model(), device="cpu", memory_format="nhwc")


def test_channels_last_is_refused_where_it_is_not_supported():
    with pytest.raises(InputError, match="not on mps"):
        Engine(random_tiny_model(), device=torch.device("mps"), memory_format="channels_last")


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="torch.compile needs a C++ compiler on CPU"
)
def test_compiled_network_gives_the_eager_result():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    eager = noise_estimate(Engine(random_tiny_model(), device="cpu", precision="fp32"), x)
    engine = Engine(random_tiny_model(), device="cpu", compile=True, precision="fp32")
    compiled = noise_estimate(engine, x)
    assert engine.network.compiled is not None  # compiled, not fallen back to eager mode
    torch.testing.assert_close(compiled, eager, **CLOSE)


def test_a_failing_compiler_falls_back_to_eager_mode_with_a_warning(monkeypatch, caplog):
    from torch._dynamo.exc import BackendCompilerFailed

    calls = []

    def broken_compile(model):
        def run(*args, **kwargs):
            calls.append(1)
            raise BackendCompilerFailed(broken_compile, RuntimeError("no C++ compiler found"), None)

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    eager = noise_estimate(Engine(random_tiny_model(), device="cpu"), x)
    with caplog.at_level(logging.WARNING):
        result = noise_estimate(Engine(random_tiny_model(), device="cpu", compile=True), x)
    torch.testing.assert_close(result, eager, rtol=0, atol=0)
    assert calls == [1]  # tried once, then never again
    assert "torch.compile failed" in caplog.text and "no C++ compiler" in caplog.text


def test_torch_compile_unavailable_at_construction_runs_eagerly(monkeypatch, caplog):
    def unsupported(model):
        raise RuntimeError("torch.compile is not supported on Python 3.15+")

    monkeypatch.setattr(torch, "compile", unsupported)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    eager = noise_estimate(Engine(random_tiny_model(), device="cpu"), x)
    with caplog.at_level(logging.WARNING):
        engine = Engine(random_tiny_model(), device="cpu", compile=True)
    assert engine.network.compiled is None and "not supported on Python 3.15+" in caplog.text
    torch.testing.assert_close(noise_estimate(engine, x), eager, rtol=0, atol=0)


def test_out_of_memory_while_compiling_halves_the_window_batch(monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed

    def compile_needing_memory(model):
        def run(x, *args, **kwargs):
            if x.shape[0] > 1:
                oom = torch.OutOfMemoryError("out of memory while autotuning (simulated)")
                raise BackendCompilerFailed(compile_needing_memory, oom, None)
            return model(x, *args, **kwargs)

        return run

    monkeypatch.setattr(torch, "compile", compile_needing_memory)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    eager = noise_estimate(Engine(random_tiny_model(), device="cpu", batch_size=4, precision="fp32"), x)
    engine = Engine(random_tiny_model(), device="cpu", batch_size=4, compile=True, precision="fp32")
    anatomy = torch.randint(0, 120, SHAPE, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    predictor = engine.predictor(Conditions(3, anatomy), SHAPE)
    torch.testing.assert_close(predictor(x, 100), eager, **CLOSE)
    assert predictor.batch_size == 1 and engine.network.compiled is not None  # still compiled


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_exactly_where_the_device_computes_it_natively(monkeypatch, native):
    monkeypatch.setattr("MedDiffFMLib.tasks.engine.native_bf16", lambda device: native)
    engine = Engine(random_tiny_model(), device="cpu")
    assert engine.autocast_dtype == (torch.bfloat16 if native else None)
    assert Engine(random_tiny_model(), device="cpu", precision="fp32").autocast_dtype is None


def test_bf16_denoising_agrees_with_float32_within_two_hu():
    import numpy as np

    from MedDiffFMLib.tasks import denoise
    from MedDiffFMLib.volume import Volume

    rng = np.random.default_rng(0)
    hu = np.full((12, 40, 40), -1000.0, dtype=np.float32)
    hu[:, 6:34, 6:34] = rng.normal(40.0, 30.0, (12, 28, 28))
    ct = Volume(hu, (3.0, 3.0, 3.0))
    results = [
        denoise(
            ct, Engine(random_tiny_model(), device="cpu", precision=p), "abdomen", sigma_n=0.1, steps=4, noise_gain=1
        ).volume
        for p in ("fp32", "bf16")
    ]
    difference = np.abs(results[0].array - results[1].array)
    assert 0 < difference.max() < 2.0


class AnatomyRecorder(torch.nn.Module):
    """Test network that records the anatomy each call receives and predicts zero noise."""

    def __init__(self, card) -> None:
        super().__init__()
        self.config = random_tiny_model().config
        self.card = card
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, coordinates, region, anatomy, control=None):
        self.seen.append(anatomy.clone())
        return torch.zeros_like(x)


def test_label_values_the_model_never_learned_reach_it_as_body_tissue(caplog):
    card = ModelCard(name="m", version="1", task="base", config={}, anatomy_hu={"abdomen": {"5": 40.0}})
    recorder = AnatomyRecorder(card)
    engine = Engine(recorder, device="cpu", precision="fp32")
    assert engine.learned_labels == {0, 5, BODY_LABEL, UNKNOWN_LABEL}
    anatomy = torch.tensor([0, 5, 110, BODY_LABEL, UNKNOWN_LABEL, 69], dtype=torch.uint8).repeat(16, 4, 1)[:, :, :6]
    with caplog.at_level(logging.WARNING):
        engine.predictor(Conditions(3, anatomy), tuple(anatomy.shape))(torch.zeros(anatomy.shape), 100)
    expected = torch.tensor([0, 5, BODY_LABEL, BODY_LABEL, UNKNOWN_LABEL, BODY_LABEL], dtype=torch.uint8)
    assert recorder.seen and all(torch.equal(seen[0, 0, 0], expected) for seen in recorder.seen)
    assert "rib_right_7" in caplog.text and "humerus_left" in caplog.text and "liver" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        engine.predictor(Conditions(3, anatomy), tuple(anatomy.shape))
    assert "rib_right_7" not in caplog.text  # one warning per set of structures, not per predictor

    recorder.card = ModelCard(name="m", version="0", task="base", config={})
    assert engine.learned_labels is None
    recorder.seen.clear()
    engine.predictor(Conditions(3, anatomy), tuple(anatomy.shape))(torch.zeros(anatomy.shape), 100)
    assert all(torch.equal(seen[0, 0, 0], anatomy[0, 0]) for seen in recorder.seen)


def test_the_slow_grid_warning_offers_the_fast_preview_only_where_a_task_has_one(monkeypatch, caplog):
    monkeypatch.setattr(weights, "BUNDLED_DIR", resources.shipped_models_dir())
    with caplog.at_level(logging.WARNING):
        build_engine(EngineOptions(task_key="denoise", device="cpu"))
    assert "--preview" in caplog.text and "meddiff-fm-demo@0.1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_engine(EngineOptions(task_key="super_resolve", controlnet_task="controlnet-sr", device="cpu"))
    assert "an hour or more" in caplog.text and "--preview" not in caplog.text
