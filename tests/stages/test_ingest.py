import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slmforge.artifacts import ArtifactStore
from slmforge.config import load_recipe
from slmforge.errors import UserError
from slmforge.records import read_documents
from slmforge.stages import ingest
from slmforge.stages.ingest import html_to_text
from tests.conftest import slmforge, write_recipe

HTML = b"""<html><head><title>Pumps</title><style>p {color: red}</style><script>var x = 1;</script></head>
<body><nav><a href="/">Home</a> | <a href="/x">Next</a></nav>
<h1>Pump maintenance</h1><p>Prime the <b>pump</b> before   start.</p>
<h2>Parts</h2><ul><li>Impeller</li><li>Seal <i>kit</i></li></ul>
<ol><li>Drain</li><li>Refill</li></ol>
<table><tr><th>Part</th><th>Interval</th></tr><tr><td>Seal</td><td>6 months</td></tr></table>
<pre>SELECT *
    FROM parts
   WHERE due;</pre><footer>Copyright</footer></body></html>"""


def make_pdf(text: str) -> bytes:
    """A minimal valid one-page PDF with a text layer."""
    content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_html_keeps_structure_and_drops_chrome():
    title, text = html_to_text(HTML)
    assert title == "Pumps"
    assert "# Pump maintenance\n\nPrime the pump before start." in text
    assert "## Parts\n\n- Impeller\n- Seal kit\n\n1. Drain\n2. Refill" in text
    assert "Part | Interval\nSeal | 6 months" in text
    assert "SELECT *\n    FROM parts\n   WHERE due;" in text  # code kept verbatim
    for gone in ("Home", "var x", "color: red", "Copyright"):
        assert gone not in text


@pytest.fixture()
def mixed_folder(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("Plain text about valves.\nSecond line.")
    (d / "b.md").write_text("Intro line\n\n# Valve guide\n\nOpen slowly.")
    (d / "c.rst").write_text("Seals\n=====\n\nReplace yearly.")
    (d / "d.html").write_bytes(HTML)
    (d / "e.jsonl").write_text('{"id": "r1", "text": "Record one.", "title": "One", "lang": "en"}\n'
                               'not json\n{"id": "r2", "body": "no text field"}\n{"text": "Record three."}\n')
    pq.write_table(pa.table({"id": ["p1", "p2"], "text": ["Parquet one.", "Parquet two."]}), d / "f.parquet")
    (d / "g.pdf").write_bytes(make_pdf("Torque the bolts to spec."))
    (d / "h.txt.gz").write_bytes(gzip.compress(b"Compressed notes on pumps."))
    # bad files: each is skipped with a reason, none stops the run
    (d / "bad_binary.txt").write_bytes(b"\x00\x01\x02binary\x00" * 10)
    (d / "bad_latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (d / "bad_empty.md").write_text("")
    (d / "bad_blank.txt").write_text("   \n\n  ")
    (d / "bad_big.txt").write_text("x" * 3000)
    (d / "bad_broken.pdf").write_bytes(b"%PDF-1.4\n garbage that is not a pdf")
    (d / "bad_archive.jsonl.gz").write_bytes(b"not gzip at all")
    (d / "bad_table.parquet").write_bytes(b"PAR1 nope")
    (d / "bad_image.png").write_bytes(b"\x89PNG\r\n")
    (d / "bad_nocol.parquet").parent.mkdir(exist_ok=True)
    pq.write_table(pa.table({"body": ["x"]}), d / "bad_nocol.parquet")
    return d


def test_every_format_and_every_bad_file(tmp_path, mixed_folder):
    recipe = write_recipe(tmp_path, {"workdir": "w", "ingest": {
        "max_file_mb": 0.002, "sources": [{"name": "docs", "paths": ["docs"]}]}})
    art = ingest.run(load_recipe(recipe).stages["ingest"], ArtifactStore(tmp_path / "w"))
    docs = {d["id"]: d for d in read_documents(art.path / "data")}
    assert set(docs) == {"docs:docs/a.txt", "docs:docs/b.md", "docs:docs/c.rst", "docs:docs/d.html", "r1",
                         "docs/e.jsonl:4", "p1", "p2", "docs:docs/g.pdf", "docs:docs/h.txt.gz"}
    assert docs["docs:docs/b.md"]["title"] == "Valve guide"
    assert docs["docs:docs/c.rst"]["title"] == "Seals"
    assert docs["r1"]["title"] == "One" and json.loads(docs["r1"]["meta"])["lang"] == "en"
    assert "Torque the bolts" in docs["docs:docs/g.pdf"]["text"]
    assert docs["docs:docs/h.txt.gz"]["text"] == "Compressed notes on pumps."
    m = art.manifest["metrics"]
    assert m["rejects_by_reason"] == {
        "binary": 1, "undecodable": 1, "empty": 2, "too_large": 1, "broken_pdf": 1, "corrupt_archive": 1,
        "corrupt_parquet": 1, "unsupported_type": 1, "missing_field": 1, "record:bad_record": 2}
    assert m["docs"] == 10 and m["sources"]["docs"]["files_rejected"] == 10
    rejects = [json.loads(line) for line in (art.path / "rejects.jsonl").read_text().splitlines()]
    assert {r["path"] for r in rejects if r["reason"] == "binary"} == {"docs/bad_binary.txt"}
    assert any(r["path"] == "docs/e.jsonl:2" for r in rejects)


def test_limit_and_duplicate_ids(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"id": "same", "text": f"doc {i}"}) + "\n" for i in range(5)))
    recipe = write_recipe(tmp_path, {"workdir": "w", "ingest": {"sources": [
        {"name": "a", "paths": ["a.jsonl"], "limit": 3}]}})
    art = ingest.run(load_recipe(recipe).stages["ingest"], ArtifactStore(tmp_path / "w"))
    assert [d["id"] for d in read_documents(art.path / "data")] == ["same", "same#2", "same#3"]


def test_empty_corpus_exits_2_and_touches_nothing(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.bin").write_bytes(b"\x00\x00")
    (tmp_path / "docs" / "y.txt").write_text("")
    recipe = write_recipe(tmp_path, {"workdir": "w", "ingest": {"sources": [{"name": "d", "paths": ["docs"]}]}})
    r = slmforge("ingest", "--recipe", str(recipe))
    assert r.returncode == 2
    assert "gave no documents" in r.stderr and "docs/x.bin: unsupported_type" in r.stderr
    assert not list((tmp_path / "w").rglob("manifest.json")) and not list((tmp_path / "w").rglob("*.partial"))
    r = slmforge("ingest", "--recipe", str(recipe), "--set", "sources=[{name: d, paths: [nowhere]}]")
    assert r.returncode == 2 and "nowhere does not exist" in r.stderr


def test_input_errors_name_the_key(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    recipe = write_recipe(tmp_path, {"ingest": {"sources": [
        {"name": "A b", "paths": ["*.nothing"], "role": "teacher"}, {"name": "g", "role": "general", "paths": ["a.txt"]}]}})
    with pytest.raises(UserError) as e:
        load_recipe(recipe)
    msg = str(e.value)
    assert "ingest.sources.0.name" in msg and "ingest.sources.0.role" in msg
    assert "'*.nothing' matches no file" in msg


def test_hostile_files_are_counted_rejects_and_never_stop_the_corpus(tmp_path):
    """Each file below once stopped the run, multiplied documents or passed bad bytes into the corpus."""
    import os

    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "good.md").write_text("# Pumps\n\nPrime the pump before starting it.")
    (d / "sub" / "also.md").write_text("# Valves\n\nOpen the valve slowly.")
    os.symlink(d, d / "sub" / "loop")  # a `**` glob used to follow it over and over
    (d / "deep.html").write_text("<html><body>" + "<div>" * 5000 + "deep" + "</div>" * 5000 + "</body></html>")
    (d / "deep_list.html").write_text("<ul>" + "<li><ul>" * 3000 + "x" + "</ul></li>" * 3000 + "</ul>")
    (d / "bomb.txt.gz").write_bytes(gzip.compress(b"a" * (3 * 2**20)))  # 3 KB on disk, 3 MiB inside
    (d / "late_nul.txt").write_bytes(b"word " * 2000 + b"\x00 more")
    (d / "mixed.jsonl").write_bytes(b'{"text": "good one"}\n{"text": "caf\xe9"}\n{"text": "nul \\u0000"}\n'
                                    b'{"text": "good two"}\n')
    (d / "no_text.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n')
    os.symlink(d / "missing.txt", d / "dangling.txt")
    os.mkfifo(d / "pipe.txt")
    recipe = write_recipe(tmp_path, {"workdir": "w", "ingest": {"max_file_mb": 1, "sources": [
        {"name": "md", "paths": ["docs/**/*.md"]}, {"name": "rest", "paths": ["docs"]}]}})
    art = ingest.run(load_recipe(recipe).stages["ingest"], ArtifactStore(tmp_path / "w"))
    m = art.manifest["metrics"]
    assert m["sources"]["md"]["docs"] == 2  # each .md once, however many times the loop reaches it
    rejects = {r["path"]: r for r in (json.loads(x) for x in (art.path / "rejects.jsonl").read_text().splitlines())}
    assert rejects["docs/bomb.txt.gz"]["reason"] == "too_large"
    assert rejects["docs/late_nul.txt"]["reason"] == "binary" and "offset 10000" in rejects["docs/late_nul.txt"]["detail"]
    assert rejects["docs/no_text.jsonl"]["reason"] == "no_usable_records"
    assert rejects["docs/dangling.txt"]["reason"] == rejects["docs/pipe.txt"]["reason"] == "not_a_file"
    assert rejects["docs/mixed.jsonl:2"]["detail"] == "not UTF-8" and rejects["docs/mixed.jsonl:3"]["reason"] == "bad_record"
    docs = {x["id"]: x["text"] for x in read_documents(art.path / "data", "rest")}
    assert docs["docs/mixed.jsonl:1"] == "good one" and docs["docs/mixed.jsonl:4"] == "good two"
    assert all("\x00" not in t for t in docs.values())
    assert rejects["docs/deep.html"]["reason"] == rejects["docs/deep_list.html"]["reason"] == "too_deep"
