from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.cli import parse_args, settings_from
from coordinator.config_file import load_config, service_flags
from jetfed.errors import InvalidConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "federation.toml"


def test_example_config_describes_the_reference_federation():
    settings = settings_from(parse_args(["--config", str(EXAMPLE)]))
    assert settings.workers == {"alice": "127.0.0.1:8777", "bob": "127.0.0.1:8778", "charlie": "127.0.0.1:8779"}
    assert settings.evaluator == "127.0.0.1:8780"
    assert (settings.rounds, settings.eval_every, settings.model) == (40, 10, "mnist-cnn")
    assert (settings.train.lr, settings.train.batch_size, settings.train.max_batches) == (0.1, 32, 10)
    flags = service_flags(EXAMPLE, Path("/data"))
    assert flags["alice"] == ["--task", "mnist", "--model", "mnist-cnn", "--data-dir", "/data", "--labels", "0-3",
                              "--partition-seed", "0"]
    assert flags["testing"] == ["--task", "mnist", "--model", "mnist-cnn", "--data-dir", "/data"]


def test_a_launcher_starts_services_with_the_task_options_folders_and_partitions(tmp_path: Path):
    config = tmp_path / "federation.toml"
    config.write_text('''
[federation]
task = "image-folder"
[task]
options = { image_size = 28, channels = 1, classes = "0,1,2" }
data_dir = "images"
[workers.a]
address = "127.0.0.1:1"
shard = "1/2"
dirichlet = 0.5
partition_seed = 3
[workers.b]
address = "127.0.0.1:2"
data_dir = "/boards/b"
[evaluator]
address = "127.0.0.1:3"
data_dir = "test-images"
''')
    load_config(config)  # the coordinator accepts (and ignores) the launcher's keys
    flags = service_flags(config, Path("/data"))
    options = ["--option", "image_size=28", "--option", "channels=1", "--option", "classes=0,1,2"]
    assert flags["a"] == ["--task", "image-folder", *options, "--data-dir", str(tmp_path / "images"), "--labels",
                          "all", "--partition-seed", "3", "--shard", "1/2", "--dirichlet", "0.5"]
    assert flags["b"][flags["b"].index("--data-dir") + 1] == "/boards/b"
    assert flags["testing"] == ["--task", "image-folder", *options, "--data-dir", str(tmp_path / "test-images")]
    config.write_text("[task]\noptions = { a = [1] }\n")
    with pytest.raises(InvalidConfig, match="options.a must be a string or a number"):
        load_config(config)


def test_flags_override_the_file():
    settings = settings_from(parse_args(["--config", str(EXAMPLE), "--rounds", "3", "--lr", "0.05",
                                         "--worker", "solo=10.0.0.2:9000", "--min-workers", "1"]))
    assert settings.rounds == 3 and settings.train.lr == 0.05
    assert settings.workers == {"solo": "10.0.0.2:9000"}
    assert settings.train.batch_size == 32


def test_without_a_file_the_defaults_are_the_reference_recipe():
    settings = settings_from(parse_args(["--worker", "a=h:1"]))
    assert (settings.rounds, settings.lr_decay, settings.train.seed, settings.weighting) == (40, 0.98, 1, "examples")


@pytest.mark.parametrize("text, field", [
    ("[training]\nlr = 'fast'\n", "lr"),
    ("[training]\nbatchsize = 3\n", "batchsize"),
    ("[federation]\nrounds = true\n", "rounds"),
    ("[wat]\n", "wat"),
    ("[workers.alice]\nlabels = '0-3'\n", "address"),
    ("[evaluator]\nname = 'x'\n", "address"),
    ("rounds = [\n", "TOML"),
])
def test_bad_files_name_the_key(tmp_path, text, field):
    path = tmp_path / "federation.toml"
    path.write_text(text)
    with pytest.raises(InvalidConfig, match=field):
        load_config(path)


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidConfig, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_wrong_types_read_as_english(tmp_path):
    path = tmp_path / "federation.toml"
    path.write_text("[federation]\nrounds = 'forty'\n")
    with pytest.raises(InvalidConfig, match=r"\[federation\] rounds = 'forty' must be an integer"):
        load_config(path)


def test_a_binary_file_is_one_clear_error(tmp_path):
    path = tmp_path / "federation.toml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InvalidConfig, match="is not a text file"):
        load_config(path)


@pytest.mark.parametrize("argv, toml", [(["--min-workers", "all"], ""), ([], "[faults]\nmin_workers = 'all'\n")])
def test_min_workers_all_requires_the_whole_fleet(tmp_path, argv, toml):
    path = tmp_path / "federation.toml"
    path.write_text(toml + "[workers.a]\naddress = 'h:1'\n[workers.b]\naddress = 'h:2'\n[workers.c]\naddress = 'h:3'\n")
    settings = settings_from(parse_args(["--config", str(path), *argv]))
    assert settings.quorum == 3


def test_min_workers_takes_a_number_or_all_only(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--min-workers", "most"])
    assert "'most' is neither a number nor 'all'" in capsys.readouterr().err
    path = tmp_path / "federation.toml"
    path.write_text("[faults]\nmin_workers = 'most'\n")
    with pytest.raises(InvalidConfig, match='min_workers = \'most\' must be an integer or "all"'):
        load_config(path)
