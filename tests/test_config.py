"""The settings schema: one declaration per field gives its flag, its settings-file keys, its checks and
its saved JSON. First a toy schema by hand, then a walk over every field of SimulationConfig,
ServerSettings and ClientSettings, then the commands as users call them."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from insitu.cli.deploy import DEPLOYED_SETTINGS, SERVER_ALIASES, _read_client_file, _read_server_file
from insitu.cli.main import app
from insitu.cli.presets import read_settings, resolve_config
from insitu.config import canonical_keys, from_mapping, key_map, schema, settable, setting, to_dict
from insitu.config.cli import with_settings
from insitu.config.doc import render
from insitu.config.schema import Field, parse_scalar
from insitu.net.client import ClientSettings
from insitu.net.server import ServerSettings
from insitu.simulation import SimulationConfig

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
REGISTRY = ["a", "b"]  # a registry filled after the schema is declared


@dataclass
class Toy:
    rounds: int = setting(5, section="run", help="Rounds.", aliases=("--steps",))
    lr: float = setting(0.1, section="training", help="Learning rate.")
    name: str = setting("a", section="run", help="A registry name.", choices=lambda: REGISTRY)
    fast: bool = setting(False, section="run", help="Go fast.")
    where: str | None = setting(None, section="data", help="A folder.")
    options: dict[str, float | int | str | bool] = setting(section="run", help="Named options.",
                                                           aliases=("--option",), default_factory=dict)


# -- the schema by hand -------------------------------------------------------------------------------
def test_a_field_declares_its_flags_keys_type_and_default():
    rounds, lr, _name, fast, where, options = schema(Toy)
    assert (rounds.flags, rounds.keys, rounds.kind, rounds.default) == (("--rounds", "--steps"), ("rounds", "steps"),
                                                                       int, 5)
    assert (where.kind, where.optional) == (str, True) and (lr.kind, fast.kind, fast.flag) == (float, bool, "--fast")
    assert (options.kind, options.default, options.flags) == (dict, {}, ("--options", "--option"))
    assert key_map(Toy)["steps"] == "rounds"


def test_values_are_checked_and_coerced_by_their_field_type():
    toy = from_mapping(Toy, {"steps": 3, "lr": 1, "fast": True, "where": "d", "options": {"f": 1, "m": "x"}})
    assert toy == Toy(3, 1.0, "a", True, "d", {"f": 1, "m": "x"}) and isinstance(toy.lr, float)
    for values, message in [({"rounds": "ten"}, "rounds must be int, got 'ten'"),
                            ({"rounds": 2.5}, "rounds must be int"),
                            ({"rounds": True}, "rounds must be int"),
                            ({"lr": "fast"}, "lr must be float"),
                            ({"fast": 1}, "fast must be bool"),
                            ({"lr": None}, "lr must be float, got nothing"),
                            ({"options": {"f": [1]}}, "options maps names to numbers, strings or booleans")]:
        with pytest.raises(ValueError, match=message):
            from_mapping(Toy, values, source="toy.toml")


def test_choices_come_from_the_registry_when_checked():
    with pytest.raises(ValueError, match="unknown name 'c'; choose one of a, b"):
        from_mapping(Toy, {"name": "c"})
    REGISTRY.append("c")
    try:
        assert from_mapping(Toy, {"name": "c"}).name == "c"
    finally:
        REGISTRY.remove("c")


def test_an_unknown_or_doubled_key_names_the_source_the_key_and_the_valid_keys():
    with pytest.raises(ValueError, match=r"toy.toml: unknown setting\(s\) roundz \(did you mean rounds\?\); "
                                         "valid keys: rounds, lr, name, fast, where, options"):
        from_mapping(Toy, {"roundz": 3}, source="toy.toml")
    with pytest.raises(ValueError, match="rounds is given twice, as 'rounds' and 'steps'"):
        canonical_keys(Toy, {"rounds": 3, "steps": 4})


def test_a_field_without_a_declaration_or_with_an_unsupported_type_is_refused():
    @dataclass
    class Bare:
        x: int = 3

    with pytest.raises(TypeError, match=r"Bare.x is not declared with insitu.config.setting"):
        schema(Bare)

    @dataclass
    class Listy:
        xs: list = setting(section="run", help="x", default_factory=list)

    with pytest.raises(TypeError, match="settings are bool, int, float, str, Path or dict"):
        schema(Listy)


def test_scalars_from_the_command_line():
    assert [parse_scalar(t) for t in ("3", "-2", "0.5", "1e-3", "true", "False", "median")] == [
        3, -2, 0.5, 1e-3, True, False, "median"]


# -- generated options -------------------------------------------------------------------------------
def toy_app(seen: list[dict[str, Any]]) -> typer.Typer:
    toy = typer.Typer()

    @toy.command()
    @with_settings(Toy)
    def run(settings: dict[str, Any], verbose: bool = typer.Option(False, "-v")) -> None:
        seen.append({**settings, "verbose": verbose})

    return toy


def test_generated_options_pass_only_what_was_given():
    seen: list[dict[str, Any]] = []
    runner = CliRunner()
    result = runner.invoke(toy_app(seen), ["--steps", "3", "--lr", "0.5", "--fast", "--option", "f=1",
                                           "--option", "m=median", "--option", "on=true", "-v"])
    assert result.exit_code == 0, result.output
    assert seen.pop() == {"rounds": 3, "lr": 0.5, "fast": True, "options": {"f": 1, "m": "median", "on": True},
                          "verbose": True}
    assert runner.invoke(toy_app(seen), ["--no-fast"]).exit_code == 0 and seen.pop() == {"fast": False,
                                                                                          "verbose": False}


def test_generated_options_refuse_bad_input_naming_the_flag():
    runner = CliRunner()
    bad_pair = runner.invoke(toy_app([]), ["--option", "f"])
    assert bad_pair.exit_code == 2 and "expected KEY=VALUE, got 'f'" in bad_pair.output
    typo = runner.invoke(toy_app([]), ["--stepz", "3"])
    assert typo.exit_code == 2 and _no_such_option("--stepz", typo.output) and "--steps" in typo.output


def test_help_groups_the_flags_by_section_and_shows_choices_and_defaults():
    text = CliRunner().invoke(toy_app([]), ["--help"], env={"COLUMNS": "200"}).output
    for panel in ("Run", "Client training", "Data"):
        assert f"─ {panel} ─" in text
    assert "One of: a, b." in text and "(default: 5)" in text and "--fast" in text and "--no-fast" in text


# -- every SimulationConfig / ServerSettings / ClientSettings field --------------------------------------------------------------------------------------
def other_value(field: Field) -> Any:
    """A valid value of the field that differs from its default."""
    names = field.setting.names()
    if names is not None:
        return next(n for n in names if n != field.default)
    if field.kind is bool:
        return not field.default
    if field.kind is int:
        return (field.default or 0) + 3
    if field.kind is float:
        return (field.default or 1.0) * 2.5 + 0.125
    if field.kind is dict:
        return {"f": 2, "beta": 0.25, "rule": "median", "on": True}
    if field.kind is Path:
        return Path("some/where.db")
    return "some-where"


def as_flags(field: Field, value: Any) -> list[str]:
    if field.kind is bool:
        return [field.flag if value else "--no-" + field.flag.removeprefix("--")]
    if field.kind is dict:
        return [a for k, v in value.items() for a in (field.flag, f"{k}={str(v).lower() if v is True else v}")]
    return [field.flag, str(value)]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


@pytest.mark.parametrize("cls", [SimulationConfig, ServerSettings, ClientSettings])
def test_every_setting_has_a_flag_and_round_trips_through_flags_toml_and_json(cls, tmp_path):
    fields = settable(cls)
    changed = {f.name: other_value(f) for f in fields}
    expected = from_mapping(cls, changed)
    for f in fields:
        assert getattr(expected, f.name) != f.default, f.name  # every field really is changed

    seen: list[dict[str, Any]] = []
    probe = typer.Typer()
    probe.command()(with_settings(cls)(lambda settings: seen.append(settings)))
    result = CliRunner().invoke(probe, [a for f in fields for a in as_flags(f, changed[f.name])])
    assert result.exit_code == 0, result.output
    assert from_mapping(cls, seen[0]) == expected

    toml = tmp_path / "all.toml"
    toml.write_text("".join(f"{f.name} = {toml_value(changed[f.name])}\n" for f in fields))
    from insitu.files import load_toml

    assert from_mapping(cls, load_toml(toml, "test")) == expected
    assert from_mapping(cls, json.loads(json.dumps(to_dict(expected)))) == expected


def test_simulate_and_server_have_a_flag_for_every_setting_they_take():
    command = get_command(app)
    simulate_flags = {o for p in command.commands["simulate"].params for o in p.opts}  # type: ignore[attr-defined]
    server_flags = {o for p in command.commands["server"].params for o in p.opts}  # type: ignore[attr-defined]
    for f in settable(SimulationConfig):
        assert set(f.flags) <= simulate_flags, f.name
    for f in settable(ServerSettings):
        assert set(f.flags) <= server_flags, f.name
    for f in settable(SimulationConfig):
        assert (set(f.flags) <= server_flags) == (f.name in DEPLOYED_SETTINGS), f.name
    assert {"--clients", "--fraction", "--config", "-c", "--output-dir", "-o", "--show-partition", "-v",
            "--aggregator-option", "--mode", "--drop-stragglers"} <= simulate_flags
    assert {"--min-clients", *SERVER_ALIASES["num_clients"], "--store", "--round-timeout", "--wait-timeout",
            "--heartbeat-timeout", "--upload-stall", "--upload-timeout", "--max-update-mb",
            "--dangerously-allow-insecure-network", "--certs", "--allow", "--mtls", "--address"} <= server_flags


def test_client_has_a_flag_for_every_setting_and_keeps_every_flag_it_had():
    params = get_command(app).commands["client"].params  # type: ignore[attr-defined]
    client_flags = {o for p in params for o in [*p.opts, *p.secondary_opts]}  # --quiet, --no-insecure
    for f in settable(ClientSettings):
        assert set(f.flags) <= client_flags, f.name
    before = {"--address", "--client-id", "--certs", "--key", "--insecure", "--dataset", "--data-dir", "--partition-id",
              "--num-partitions", "--partition", "--alpha", "--partition-seed", "--csv", "--label-column",
              "--num-classes", "--model", "--train-limit", "--give-up-after", "--dp-min-noise", "--state-dir",
              "--verbose", "--quiet"}  # the hand-written typer options the command had
    assert before <= client_flags
    assert {"--config", "-c", "--poll-wait", "--give-up-after-s", "--poll-wait-s"} <= client_flags


def test_a_client_file_is_its_client_table_or_its_top_level_and_may_be_shared_with_the_server(tmp_path):
    shared = tmp_path / "fed.toml"
    shared.write_text('[simulate]\nrounds = 2\nclients = 3\n\n[server]\nround_timeout = 60\n\n'
                      '[client]\nclient-id = "h7"\ngive_up_after = 30\npoll_wait = 2\npartition_id = 1\n'
                      'certs = "fed/clients/h7"\n')
    values, source = _read_client_file(shared)
    assert values == {"client_id": "h7", "give_up_after_s": 30, "poll_wait_s": 2, "partition_id": 1,
                      "certs": "fed/clients/h7"}
    assert source == f"{shared} [client]"
    assert from_mapping(ClientSettings, values) == ClientSettings(client_id="h7", give_up_after_s=30.0,
                                                                  poll_wait_s=2.0, partition_id=1,
                                                                  certs=Path("fed/clients/h7"))
    assert _read_server_file(shared) == ({"rounds": 2, "num_clients": 3}, {"round_timeout_s": 60})  # ignores [client]
    top = tmp_path / "client.toml"
    top.write_text('client_id = "3"\ndataset = "breast-cancer"\n')
    assert _read_client_file(top) == ({"client_id": "3", "dataset": "breast-cancer"}, str(top))
    bad = tmp_path / "bad.toml"
    bad.write_text("[client]\nclient_id = 1\n")
    with pytest.raises(ValueError, match=r"bad.toml \[client\]: client_id must be str or nothing, got 1"):
        from_mapping(ClientSettings, *_read_client_file(bad))
    bad.write_text("client = 3\n")
    with pytest.raises(ValueError, match=r"\[client\] must be a table"):
        _read_client_file(bad)


def test_client_refuses_an_unknown_key_a_bad_value_or_no_client_id_naming_the_valid_ones(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "client.toml"
    bad.write_text('[client]\nclient_id = "0"\nadress = "x:1"\n')
    unknown = runner.invoke(app, ["client", "--config", str(bad), "--insecure"], env={"COLUMNS": "200"})
    text = " ".join(unknown.output.split())
    assert unknown.exit_code == 2 and "[client]: unknown setting(s) adress (did you mean address?)" in text
    assert "valid keys: address, client_id, certs, key, insecure, dataset" in text
    bad.write_text('[client]\nclient_id = "0"\npartition = "stripes"\n')
    choice = runner.invoke(app, ["client", "--config", str(bad), "--insecure"], env={"COLUMNS": "200"})
    text = " ".join(choice.output.split())
    assert choice.exit_code == 2 and "unknown partition 'stripes'; choose one of iid, dirichlet" in text
    missing = runner.invoke(app, ["client", "--insecure"], env={"COLUMNS": "200"})
    text = " ".join(missing.output.split())
    assert missing.exit_code == 2 and "give this client's id: --client-id ID, or client_id" in text
    poll = runner.invoke(app, ["client", "--insecure", "--client-id", "0", "--poll-wait", "0"], env={"COLUMNS": "200"})
    assert poll.exit_code == 2 and "--poll-wait must be in (0, 30]" in " ".join(poll.output.split())
    flag = runner.invoke(app, ["client", "--client-id", "0", "--adress", "x"], env={"COLUMNS": "200"})
    assert flag.exit_code == 2 and _no_such_option("--adress", flag.output)


def test_a_runs_config_json_is_read_back_unchanged(tmp_path):
    config = resolve_config(None, {"clients": 3, "aggregator_options": {"f": 1}, "rounds": 2, "dp_delta": 1e-7})
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(asdict(config), indent=2))  # as cli/outputs.py writes it
    assert resolve_config(saved, {}) == config
    assert resolve_config(saved, {"rounds": 4}).rounds == 4  # flags still override the file


def test_toml_tables_aliases_and_unknown_keys(tmp_path):
    good = tmp_path / "fl.toml"
    good.write_text('[simulate]\nclients = 4\nfraction = 0.5\n\n[simulate.aggregator_options]\nf = 1\nrule = "x"\n')
    assert read_settings(good) == {"num_clients": 4, "fraction_fit": 0.5, "aggregator_options": {"f": 1, "rule": "x"}}
    bad = tmp_path / "bad.toml"
    bad.write_text("clints = 3\n")
    with pytest.raises(ValueError, match=r"bad.toml: unknown setting\(s\) clints \(did you mean clients\?\); "
                                         "valid keys: dataset, data_dir"):
        read_settings(bad)


def test_simulate_refuses_an_unknown_flag_or_key_naming_the_valid_ones(tmp_path):
    runner = CliRunner()
    flag = runner.invoke(app, ["simulate", "--clints", "3"], env={"COLUMNS": "200"})
    assert flag.exit_code == 2 and _no_such_option("--clints", flag.output) and "--clients" in flag.output
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = 2\nlocal_epoch = 1\n")
    key = runner.invoke(app, ["simulate", "--config", str(bad)], env={"COLUMNS": "200"})
    text = " ".join(key.output.split())
    assert key.exit_code == 2 and "unknown setting(s) local_epoch (did you mean local_epochs?)" in text
    assert "valid keys: dataset," in text
    server = tmp_path / "server.toml"
    server.write_text("rounds = 2\n[server]\nround_timeout = 5\nadress = 'x'\n")
    refused = runner.invoke(app, ["server", "--config", str(server), "--insecure"], env={"COLUMNS": "200"})
    text = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "[server]: unknown setting(s) adress (did you mean address?)" in text


def test_the_flag_tables_in_docs_cli_md_are_current():
    text = DOCS.read_text()
    assert render(text) == text, "docs/cli.md is stale: run python -m insitu.config.doc docs/cli.md"


def test_a_server_refuses_simulation_settings_it_cannot_honour_unless_they_are_at_their_value(tmp_path):
    runner = CliRunner()
    args = ["server", "--insecure", "--address", "127.0.0.1:0", "--min-clients", "2", "--wait-timeout", "0.3",
            "--test-limit", "50"]
    saved = tmp_path / "config.json"  # a simulation's config.json: its client-side settings at the preset's values
    # ... run on worker processes: how a simulation ran its clients does not concern a server
    saved.write_text(json.dumps(asdict(resolve_config(None, {"rounds": 2, "lr": 0.3, "engine": "processes",
                                                            "workers": 2}))))
    waited = runner.invoke(app, [*args, "--config", str(saved), "-o", str(tmp_path / "a")], env={"COLUMNS": "200"})
    assert waited.exit_code == 2 and "required clients connected" in " ".join(waited.output.split())
    toml = tmp_path / "fed.toml"
    toml.write_text('rounds = 2\npartition = "shards"\nattack = "sign_flip"\n')
    refused = runner.invoke(app, [*args, "--config", str(toml), "-o", str(tmp_path / "b")], env={"COLUMNS": "200"})
    text = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "attack, partition describe simulated clients" in text


def _no_such_option(flag: str, output: str) -> bool:
    """Click's refusal of an unknown flag, in either wording (``No such option: --x``, or ``No such option
    '--x'`` as the click/typer that flwr 1.42 pins prints it)."""
    return re.search(rf"No such option:? '?{re.escape(flag)}\b", output) is not None
