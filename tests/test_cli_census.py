"""Issue 24: one command line. Every option name means one thing, with one syntax and one default, on every
command that has it; renamed spellings stay for one release, hidden, with a deprecation line."""

from __future__ import annotations

from collections import defaultdict

import typer.main

from dsctl.cli import app

# Every option name that more than one command has, with its one meaning. A name shared by two commands and
# missing here fails the census: give it a meaning, or another name.
MEANINGS = {
    "--data": "the data source SOURCE[:ROOT]",
    "--out": "where the command writes its result (a file for export, a folder elsewhere)",
    "--set": "a recipe override key=value",
    "--device": "the device to run on: auto, cpu, cuda or cuda:N",
    "--seed": "the recipe's seed",
    "--resume": "the run folder to continue",
    "--quiet": "log lines instead of progress bars", "-q": "see --quiet",
    "--allow-changed": "continue although recipe, data or code changed (recorded in provenance.json)",
    "--init-from": "weights to start from", "--init-ema": "take a checkpoint's EMA weights",
    "--json": "the tables as JSON on stdout", "--csv": "the tables' rows to a CSV file",
    "--width": "a sub-network's width (slimming ratio, largest or k=N)", "-w": "see --width",
    "--input-size": "the input resolution",
    "--dynamic": "the gate's routing instead of one static sub-network",
    "--target-macs": "a MACs budget in millions",
    "--threads": "CPU threads while timing",
    "--min-run-time": "seconds of timing per candidate and batch size",
    "--latency-batch": "the batch size latency is timed or budgeted at, besides batch 1",
    "--compile": "time under torch.compile",
    "--tensorboard": "live scalars to <run>/tensorboard",
    "--title": "the title of the plots (and of REPORT.md)",
}
# names whose syntax or default differs by command on purpose, and why
DIFFERS_ON_PURPOSE = {
    "--out": "a file for export, a folder elsewhere; the default names the command's own place",
    "--width": "one value where a command acts on one sub-network (export, eval, baseline); repeatable or "
               "comma-separated where it compares several (flops, bench)", "-w": "see --width",
    "--min-run-time": "bench's unset value takes the recipe's measure.min_run_time_s",
    "--latency-batch": "train-gate's unset value takes the recipe's gate.latency_batch (32)",
    "--threads": "bench's unset value takes the recipe's measure.threads",
}
DEPRECATED = {("bench", "--widths"), ("report", "--batch"), ("analyze", "--batches"), ("analyze", "--budget")}


def _options() -> dict[str, list[tuple[str, object]]]:
    uses = defaultdict(list)
    for name, cmd in typer.main.get_command(app).commands.items():
        for p in cmd.params:
            if p.param_type_name != "option" or p.hidden:
                continue
            for opt in p.opts:
                uses[opt].append((name, p))
    return uses


def test_every_option_name_has_one_meaning_syntax_and_default() -> None:
    problems = []
    for opt, uses in _options().items():
        if len(uses) < 2:
            continue
        if opt not in MEANINGS:
            problems.append(f"{opt} ({', '.join(c for c, _ in uses)}): shared, with no declared meaning")
        if opt in DIFFERS_ON_PURPOSE:
            continue
        forms = {(p.multiple, p.is_flag, repr(p.default), str(p.type_descriptor.annotation)) for _, p in uses}
        if len(forms) > 1:
            problems.append(f"{opt}: " + "; ".join(f"{c}: default {p.default!r}, {p.type_descriptor.annotation}, "
                                                   f"multiple={p.multiple}" for c, p in uses))
    assert not problems, "\n".join(problems)


def test_tables_come_as_json_or_csv_from_every_command_that_prints_one() -> None:
    uses = _options()
    table_commands = {"models", "flops", "export", "train-supernet", "calibrate-bn", "convert", "train-gate",
                      "baseline", "eval", "bench", "report", "quickstart", "analyze"}
    have_json = {c for c, _ in uses["--json"]}
    have_csv = {c for c, _ in uses["--csv"]}
    assert table_commands <= have_json and table_commands <= have_csv


def test_old_spellings_are_hidden_and_still_accepted() -> None:
    hidden = {(name, opt) for name, cmd in typer.main.get_command(app).commands.items()
              for p in cmd.params if p.param_type_name == "option" and p.hidden for opt in p.opts}
    assert DEPRECATED <= hidden


def test_json_is_the_only_thing_on_stdout_and_csv_writes_the_rows(tmp_path) -> None:
    import csv
    import json

    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["flops", "tiny_ds_resnet", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["subnet"] for row in rows][:2] == ["k0", "k1"] and all(row["macs"] > 0 for row in rows)
    r = CliRunner().invoke(app, ["models", "--csv", str(tmp_path / "m.csv")])
    assert r.exit_code == 0
    assert {row["model"] for row in csv.DictReader(open(tmp_path / "m.csv"))} >= {"ds_resnet50", "tiny_ds_vit"}


def test_every_commands_help_reads_whole_at_80_columns(monkeypatch) -> None:
    """Issue 24: help at 80 columns in a non-terminal never cuts a word to an ellipsis."""
    from typer.testing import CliRunner

    monkeypatch.setenv("COLUMNS", "80")
    for name in [None, *typer.main.get_command(app).commands]:
        r = CliRunner().invoke(app, [name, "--help"] if name else ["--help"], env={"COLUMNS": "80"})
        assert r.exit_code == 0, name
        assert "…" not in r.output, f"dsctl {name} --help cuts a word at 80 columns"
        assert max(len(line) for line in r.output.splitlines()) <= 80, name
