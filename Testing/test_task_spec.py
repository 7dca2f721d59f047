"""The task definitions (MedDiffFMLib/task_spec.py): settings, generated command line, job files, a new task."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import random_tiny_model

from MedDiffFMLib import cli
from MedDiffFMLib.diffusion.samplers import SAMPLERS
from MedDiffFMLib.errors import InputError
from MedDiffFMLib.job import Job, output_path_beside, run_job
from MedDiffFMLib.model import weights as w
from MedDiffFMLib.preprocessing import REGIONS
from MedDiffFMLib.task_spec import (
    PREVIEW_OVERLAP,
    REGION_NAMES,
    SAMPLER_NAMES,
    TASKS,
    Output,
    Role,
    RunContext,
    Setting,
    TaskResult,
    TaskSpec,
    register,
)
from MedDiffFMLib.volume import read_volume, write_volume

ROOT = Path(__file__).resolve().parents[1]

FLAGS_BEFORE_THE_SPECS = {
    "denoise": {"--anatomy", "--sigma", "--noise-gain", "--lam", "--steps", "--zeta", "--series-uid", "--region"},
    "synthesize": {"--region", "--sampler", "--steps", "--eta"},
    "detect-anomalies": {
        "--anatomy",
        "--organ",
        "--mask-output",
        "--t",
        "--threshold",
        "--draws",
        "--series-uid",
        "--region",
    },
    "super-resolve": {"--spacing", "--steps", "--sigma", "--lam", "--zeta", "--controlnet", "--series-uid", "--region"},
    "generate-lesion": {"--lesion", "--region", "--sampler", "--steps", "--eta", "--controlnet"},
    "inpaint-lesion": {
        "--lesion",
        "--anatomy",
        "--steps",
        "--jump-length",
        "--jump-count",
        "--margin",
        "--controlnet",
        "--series-uid",
        "--region",
    },
}
"""Every task flag the command line had when each task was spelled out by hand (engine flags aside)."""
FLAGS_ADDED_SINCE = {
    "detect-anomalies": {"--organ-only"},
    "super-resolve": {"--draws"},
    "synthesize": {"--start-from", "--start", "--typical-hu"},
    "generate-lesion": {"--start-from", "--start", "--typical-hu", "--scope", "--lesion-steps", "--margin"},
}


def _subcommands(parser):
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def _task_flags(parser) -> set[str]:
    engine = {
        a.option_strings[0] for g in parser._action_groups if g.title == "model and compute" for a in g._group_actions
    }
    return {a.option_strings[0] for a in parser._actions if a.option_strings} - engine - {"-h"}


def test_the_names_the_definitions_repeat_are_the_library_s():
    assert REGION_NAMES == tuple(REGIONS) and SAMPLER_NAMES == SAMPLERS


def test_the_command_line_has_the_flags_it_had_with_their_defaults():
    commands = _subcommands(cli.build_parser())
    for command, flags in FLAGS_BEFORE_THE_SPECS.items():
        assert _task_flags(commands[command]) == flags | {"--preview"} | FLAGS_ADDED_SINCE.get(command, set()), command
    for spec in TASKS.values():
        parser = commands[spec.command]
        positional = ["input" if r.name == "ct" else r.name for r in spec.inputs if r.positional] + ["output"]
        required = [
            flag for role in spec.inputs if not role.positional and role.required for flag in (role.cli_flag, "liver")
        ]
        required += [flag for s in spec.settings if s.required for flag in (s.cli_flag, "liver")]
        required += ["--region", "chest"] if spec.region_required else []
        args = parser.parse_args([*(f"{name}.nrrd" for name in positional), *required])
        resolved = spec.resolve({setting.name: getattr(args, setting.name) for setting in spec.settings})
        for setting in spec.settings:
            if not setting.required:
                assert resolved[setting.name] == setting.default, (spec.key, setting.name)
    # A value given on the command line is kept by --preview, even when it equals the default.
    args = commands["denoise"].parse_args(["in.nrrd", "out.nrrd", "--steps", "10", "--preview"])
    assert TASKS["denoise"].preview_settings({"steps": args.steps})["steps"] == 10


def test_settings_are_checked_against_their_definition():
    denoise = TASKS["denoise"]
    assert denoise.resolve({})["sigma_n"] == "auto" and denoise.resolve({"steps": 4.0})["steps"] == 4
    assert denoise.resolve({"steps": None})["steps"] == denoise.setting("steps").default
    with pytest.raises(InputError, match="Unknown setting.*stepz.*Known: sigma_n"):
        denoise.resolve({"stepz": 3})
    with pytest.raises(InputError, match=r"--steps must be a int, got 2.5"):
        denoise.resolve({"steps": 2.5})
    with pytest.raises(InputError, match=r"--zeta must be within \[0, 1\]"):
        denoise.resolve({"zeta": 1.5})
    with pytest.raises(InputError, match="--steps must be at least 1, got 0"):
        denoise.resolve({"steps": 0})
    with pytest.raises(InputError, match="--sigma must be a float or 'auto'"):
        denoise.resolve({"sigma_n": "automatic"})
    with pytest.raises(InputError, match="--sigma must be a float, got 'auto'"):
        TASKS["super_resolve"].resolve({"sigma_n": "auto"})
    anomaly = TASKS["detect_anomalies"]
    assert anomaly.resolve({"organs": "liver"})["organs"] == ["liver"]
    with pytest.raises(InputError, match="needs --organ"):
        anomaly.resolve({})
    with pytest.raises(InputError, match="must be one of ddpm, ddim, dpm"):
        TASKS["synthesize"].resolve({"sampler": "euler"})
    with pytest.raises(InputError, match="needs the ct input"):
        denoise.check_inputs({"anatomy": object()})


def test_a_table_setting_takes_name_number_items_from_every_front_end():
    synthesize = TASKS["synthesize"]
    expected = {"liver": 100.0, "aorta": 160.0, "5": -20.0}
    given = (
        ["liver=100", "aorta = 160,5=-20"],  # repeated flags, one with a comma
        "liver=100, aorta=160, 5=-20,",  # the panel's line
        {"liver": 100, "aorta": 160.0, 5: "-20"},  # Python and job files
    )
    for value in given:
        assert synthesize.resolve({"label_hu": value})["label_hu"] == expected
    args = cli.build_parser().parse_args(
        ["synthesize", "a.nrrd", "o.nrrd", "--region", "abdomen", "--typical-hu", "liver=100", "--typical-hu", "5=7"]
    )
    assert synthesize.resolve({"label_hu": args.label_hu})["label_hu"] == {"liver": 100.0, "5": 7.0}
    for wrong in ("liver", "liver=high", "=100", "liver=nan", ""):
        with pytest.raises(InputError, match="--typical-hu takes NAME=NUMBER items"):
            synthesize.resolve({"label_hu": wrong})
    with pytest.raises(InputError, match=r"--typical-hu must be within \[-1024, 3071\], got 5000"):
        synthesize.resolve({"label_hu": "liver=5000"})


def test_structure_names_are_made_canonical_and_wrong_ones_refused_before_a_model_loads(tmp_path, files):
    anomaly, synthesize = TASKS["detect_anomalies"], TASKS["synthesize"]
    assert anomaly.resolve({"organs": ["Liver", "portal vein and splenic vein"]})["organs"] == [
        "liver",
        "portal_vein_and_splenic_vein",
    ]
    assert synthesize.resolve({"label_hu": "Liver=100,5=7"})["label_hu"] == {"liver": 100.0, "5": 7.0}
    with pytest.raises(InputError, match="--typical-hu: Unknown structure 'livr'. Did you mean 'liver'"):
        synthesize.resolve({"label_hu": "livr=100"})

    def no_model(options):
        raise AssertionError("the model was loaded before the settings were checked")

    ct, seg, _ = files
    outputs = {"map": str(tmp_path / "m.nrrd"), "mask": str(tmp_path / "mask.nrrd")}
    job = Job("detect_anomalies", {"ct": ct, "anatomy": seg}, outputs, {"organs": ["livr"]})
    with pytest.raises(InputError, match="--organ: Unknown structure 'livr'. Did you mean 'liver'"):
        run_job(job, no_model)
    assert not (tmp_path / "m.nrrd").exists()


@pytest.fixture
def files(tmp_path, small_ct, small_seg):
    model = tmp_path / "tiny.safetensors"
    w.save_checkpoint(random_tiny_model(), model, w.ModelCard(name="tiny", version="1", task="base", config={}))
    ct = write_volume(small_ct, tmp_path / "ct.nrrd")
    seg = write_volume(small_seg, tmp_path / "seg.nrrd")
    return str(ct), str(seg), str(model)


def test_a_job_file_runs_like_the_subcommand(tmp_path, files, capsys):
    ct, seg, model = files
    direct = tmp_path / "direct.nrrd"
    assert cli.main(["denoise", ct, str(direct), "--anatomy", seg, "--model", model, "--steps", "2", "--quiet"]) == 0
    job = Job(
        "denoise",
        {"ct": ct, "anatomy": seg},
        {"volume": str(tmp_path / "from_job.nrrd")},
        {"steps": 2},
        engine={"model": model},
    )
    path = job.write(tmp_path / "job.json")
    assert Job.read(path) == job
    assert cli.main(["run", str(path), "--quiet"]) == 0
    assert "window evaluations" in capsys.readouterr().out
    np.testing.assert_array_equal(read_volume(tmp_path / "from_job.nrrd").array, read_volume(direct).array)
    assert cli.main(["run", str(path), "--quiet"]) == 2  # the output exists: refused, not overwritten
    assert "already exists" in capsys.readouterr().err


def test_the_fast_preview_does_less_work_and_keeps_what_the_user_changed(tmp_path, files):
    denoise = TASKS["denoise"]
    assert denoise.preview_settings({})["steps"] == 4 and denoise.preview_settings({"steps": 7})["steps"] == 7
    assert denoise.preview_settings({"steps": None})["steps"] == 4
    for spec in TASKS.values():  # every preview is a valid setting of its task
        spec.resolve(spec.preview_settings({"organs": ["liver"]} if spec.key == "detect_anomalies" else {}))
    ct, seg, model = files
    evaluations, overlaps = {}, {}

    def engine_factory(options):
        overlaps[len(overlaps)] = options.overlap
        return cli._cached_engine(options, None)

    for preview in (False, True):
        job = Job("denoise", {"ct": ct}, {"volume": str(tmp_path / f"{preview}.nrrd")}, engine={"model": model})
        job.preview = preview
        evaluations[preview] = run_job(job, engine_factory).fields["network_evaluations"]
    assert overlaps == {0: 0.5, 1: PREVIEW_OVERLAP}
    assert evaluations[True] * 3 < evaluations[False]


def test_broken_job_files_say_what_is_wrong(tmp_path):
    path = tmp_path / "job.json"
    job = {"version": 1, "task": "denoise", "inputs": {}, "outputs": {"volume": "o.nrrd"}}
    path.write_text(json.dumps({**job, "x": 1}))
    with pytest.raises(InputError, match="Unknown key.*x"):
        Job.read(path)
    path.write_text(json.dumps({**job, "outputs": {"map": "o.nrrd"}}))
    with pytest.raises(InputError, match="writes the outputs volume"):
        Job.read(path)
    path.write_text("{}")
    with pytest.raises(InputError, match="not a MedDiffFM job file"):
        Job.read(path)
    with pytest.raises(InputError, match="Unknown engine option"):
        Job("denoise", {"ct": "c.nrrd"}, {"volume": "o.nrrd"}, engine={"devices": "cpu"})
    assert output_path_beside("a/map.nii.gz", "mask").as_posix() == "a/map_mask.nii.gz"


def _denoise_then_detect(engine, inputs, settings, context: RunContext) -> TaskResult:
    """A task defined outside the library: denoise, then look for anomalies in the denoised CT."""
    keywords = dict(region=context.region, seed=context.seed, progress=context.progress, cancel=context.cancel)
    denoised = TASKS["denoise"].run(engine, inputs, {"steps": settings["steps"]}, **keywords)
    ct = denoised.volumes["volume"]
    found = TASKS["detect_anomalies"].run(
        engine, {"ct": ct, "anatomy": inputs["anatomy"]}, {"organs": settings["organs"]}, **keywords
    )
    return TaskResult({"volume": ct, **found.volumes}, message=found.message)


@pytest.fixture
def new_task():
    """The TaskSpec of a task defined here, registered for the test and removed after it."""
    spec = register(
        TaskSpec(
            "denoise_then_detect",
            "denoise-then-detect",
            "Denoise, then detect anomalies",
            "denoise a low-dose CT, then find anomalies in an organ",
            "Denoising followed by anomaly detection.",
            _denoise_then_detect,
            inputs=(Role("ct", "CT (HU)", positional=True), Role("anatomy", "anatomy label map")),
            outputs=(
                Output("volume", "denoised"),
                Output("map", "anomaly map", flag="--map-output", kind="difference"),
                Output("mask", "anomalies", flag="--mask-output", kind="mask", segment="anomaly"),
            ),
            settings=(
                Setting("steps", 2, "denoising steps", kind="int", minimum=1, panel="steps"),
                Setting("organs", None, "organ name", kind="names", flag="--organ", required=True, panel="organs"),
            ),
        )
    )
    yield spec
    TASKS.pop(spec.key)


def test_a_new_task_is_its_definition_and_its_run_function(tmp_path, files, new_task, capsys):
    """Registering one TaskSpec gives the command line a subcommand, job files and the panel its rows."""
    sys.path.insert(0, str(ROOT / "MedDiffFM"))
    from MedDiffFMSlicer.taskinfo import rows_of_task

    spec = new_task
    # No other volumes: its required anatomy belongs to the one CT.
    assert rows_of_task(spec.key) == {"inputVolume", "anatomy", "organs"}
    ct, seg, model = files
    out = tmp_path / "denoised.nrrd"
    arguments = ["denoise-then-detect", ct, str(out), "--anatomy", seg, "--organ", "liver", "--model", model]
    assert cli.main([*arguments, "--quiet"]) == 0, capsys.readouterr().err
    assert "anomalous voxels" in capsys.readouterr().out
    for name in ("denoised.nrrd", "denoised_map.nrrd", "denoised_mask.nrrd"):
        assert read_volume(tmp_path / name).geometry.same_grid(read_volume(ct).geometry)
    with pytest.raises(ValueError, match="exists already"):
        register(spec)


def test_the_definitions_import_without_numpy_or_torch():
    code = "import sys, MedDiffFMLib.task_spec; print([m for m in ('numpy', 'torch') if m in sys.modules])"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )
