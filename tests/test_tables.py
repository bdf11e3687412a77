"""The documentation's result tables are generated from the committed result files."""

import pytest

from benchmarks import tables

RESULTS_DOC = tables.ROOT / "docs" / "results.md"


@pytest.mark.parametrize("doc", tables.DOCUMENTS, ids=lambda p: p.name)
def test_committed_tables_are_what_the_result_files_give(doc):
    """``python -m benchmarks.tables --write`` changes nothing: no table has drifted from its
    JSON file (run it after changing a result file or a table's code)."""
    text = doc.read_text()
    assert tables.fill(text, doc.parent) == text, (
        f"{doc.name} is out of date: run python -m benchmarks.tables --write"
    )
    assert tables.stale() == []


def test_every_committed_result_has_its_table_in_results_md():
    text = RESULTS_DOC.read_text()
    for name in tables.TABLES:
        if name not in {"headline", "demo"} and tables.available(name):
            assert f"<!-- tables:{name} -->" in text, name


def test_every_table_names_its_files_and_commands():
    for name, table in tables.TABLES.items():
        if not tables.available(name) or not table.files:
            continue
        rendered = tables.render(name)
        for f, command in zip(table.files, table.commands, strict=True):
            assert f"[`benchmarks/results/{f}`](benchmarks/results/{f})" in rendered, name
            assert f"written by `{command}`" in rendered, name


def test_fill_rewrites_only_between_the_markers():
    doc = (
        "# Title\n\nHand-written text.\n\n<!-- tables:overhead -->\nstale\n"
        "<!-- /tables:overhead -->\n\nMore text, mentioning `<!-- tables:NAME -->`.\n"
    )
    filled = tables.fill(doc)
    assert filled.startswith("# Title\n\nHand-written text.\n\n<!-- tables:overhead -->\n\n")
    assert filled.endswith(
        "<!-- /tables:overhead -->\n\nMore text, mentioning `<!-- tables:NAME -->`.\n"
    )
    assert "stale" not in filled and "| metagrad lstm h8 |" in filled
    assert tables.fill(filled) == filled
    # links are relative to the document's folder
    assert "](../benchmarks/results/metagrad-overhead.json)" in tables.fill(doc, RESULTS_DOC.parent)


def test_unknown_and_unclosed_markers_are_errors():
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        tables.fill("<!-- tables:nope -->\n<!-- /tables:nope -->\n")
    with pytest.raises(ValueError, match=r"has no <!-- /tables:overhead -->"):
        tables.fill("<!-- tables:overhead -->\ntext\n")


def test_a_missing_result_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"benchmarks/results/metagrad-overhead\.json"):
        tables.render("overhead")


def test_check_and_write(monkeypatch, tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- tables:overhead -->\n<!-- /tables:overhead -->\n")
    monkeypatch.setattr(tables, "DOCUMENTS", (doc,))
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    assert tables.main(["--check"]) == 1
    assert "doc.md: tables out of date" in capsys.readouterr().out
    assert tables.main(["--write"]) == 0
    assert "| metagrad lstm h8 |" in doc.read_text()
    assert tables.main(["--check"]) == 0
