"""slmforge's own datatrove steps: C4's document rules without its line rewriting, PII redaction tuned
for technical text, the train/val/test split and a progress counter.

Module-level classes (not defined inside a function), so that every executor can ship them to its
workers: the local one forks, Ray pickles the steps with cloudpickle and Slurm's jobs unpickle
datatrove's `executor.pik` with dill; both find these classes by their import path, in the same
installed slmforge. Importing this module imports datatrove (and spacy: `python -X importtime -c "import
slmforge.curation.steps"` shows the cost): curate does it lazily.
"""

from __future__ import annotations

import re
from functools import partial

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters import C4QualityFilter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.pipeline.formatters.pii import PIIFormatter

from slmforge.curation import split_of

_PHONE = (r"(?<![\w.+/-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w.-])"
          r"|(?<![\w.+/-])\+\d{1,3}(?:[ .-]\d{2,5}){2,4}(?![\w.-])")
_SECRETS = [
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key id
    r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b|\bgithub_pat_[A-Za-z0-9_]{22,255}\b",  # GitHub tokens
    r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}",  # OpenAI / Anthropic style keys
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}",  # Slack tokens
    r"\bAIza[0-9A-Za-z_-]{35}\b",  # Google API keys
    r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}",  # JSON web tokens
    r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----[\s\S]+?-----END (?:[A-Z]+ )?PRIVATE KEY-----",
]
_ASSIGNED_SECRET = re.compile(
    r"(?i)\b((?:api|secret|access|auth|client|private)[_-]?(?:key|token|secret))(\s*[:=]\s*[\"']?)"
    r"([A-Za-z0-9_\-/+=.]{16,})")


_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\.?\d|/)")  # not a CIDR network
_NUMBERING = re.compile(r"(?i)(?:section|sect\.|table|figure|fig\.|example|chapter|appendix|part|step|version|v)\s*$")


def _ip_replacement(m: re.Match, text: str) -> str | None:
    """A documentation address for a public IPv4 address; None (keep) for private ones and numbering."""
    import ipaddress

    before = text[max(0, m.start() - 12): m.start()]
    if _NUMBERING.search(before):
        return None
    line_start = text.rfind("\n", 0, m.start()) + 1
    if not text[line_start:m.start()].strip() and text[m.end(): m.end() + 2] in (". ", ".\n"):
        return None  # "24.2.2.1. Standard Collations": a numbered heading
    try:
        if not ipaddress.ip_address(m.group(0)).is_global:
            return None
    except ValueError:
        return None
    return "192.0.2.1"  # TEST-NET-1 (RFC 5737), reserved for documentation


def doc_bytes(doc) -> bytes:
    # bytes, not str: datatrove's default xxhash signature function only takes bytes
    return doc.text.encode("utf-8")


def row_adapter(self, doc) -> dict:
    """A datatrove Document as a row of records.DOCUMENT_SCHEMA (ParquetWriter's adapter)."""
    md = doc.metadata
    return {"id": doc.id, "source": md.get("source", ""), "title": md.get("title") or "", "text": doc.text,
            "meta": md.get("meta") or "{}"}


def _constant(value: str, m: re.Match, text: str) -> str:
    return value


def _assigned_secret(m: re.Match, text: str) -> str:
    return m.group(1) + m.group(2) + "<REDACTED_SECRET>"


class C4DocumentRules(C4QualityFilter):
    """C4's document-level verdicts without its line rewriting (which strips code indentation)."""

    name = "⛰ C4 document rules"

    def filter(self, doc):
        text = doc.text
        result = super().filter(doc)
        doc.text = text
        return result


class RedactPII(BaseFormatter):
    """E-mail addresses (datatrove's pattern), public IPv4 addresses, phone numbers and secrets.

    datatrove's own IP replacer rewrites every public-looking dotted quad, the PostgreSQL manual's
    section numbers included ("see Section 55.2.2.1"). Here a
    quad preceded by Section/Table/Figure/... or numbering a heading is left alone. `pii` is curate's
    PII section (emails, ips, phones, secrets: booleans)."""

    name = "📞 PII redaction"

    def __init__(self, pii):
        super().__init__()
        self.rules = []  # (kind, regex, function(match, text) -> replacement or None to keep)
        if pii.emails:
            self.rules.append(("email", PIIFormatter().emails_replacer.regex, partial(_constant, "email@example.com")))
        if pii.ips:
            self.rules.append(("ip", _IPV4, _ip_replacement))
        if pii.phones:
            self.rules.append(("phone", re.compile(_PHONE), partial(_constant, "555-0100")))
        if pii.secrets:
            self.rules.append(("secret", re.compile("|".join(_SECRETS)), partial(_constant, "<REDACTED_SECRET>")))
            self.rules.append(("secret", _ASSIGNED_SECRET, _assigned_secret))

    def format(self, text: str) -> str:
        for kind, regex, replace in self.rules:
            count = 0

            def sub(m, _text=text, _replace=replace):
                nonlocal count
                new = _replace(m, _text)
                if new is None:
                    return m.group(0)
                count += 1
                return new

            text = regex.sub(sub, text)
            if count:
                self.stat_update(f"redacted_{kind}", value=count)
        return text


class AssignSplit(PipelineStep):
    """Sets metadata['split'] from a hash of the id."""

    name = "🔀 train/val/test split"
    type = "🔀 - SPLIT"

    def __init__(self, val: float, test: float, salt: str):
        super().__init__()
        self.val, self.test, self.salt = val, test, salt

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            doc.metadata["split"] = split_of(doc.id, self.val, self.test, self.salt)
            self.stat_update(doc.metadata["split"])
            yield doc


# Counters for the local executor's progress bar, set before datatrove forks its workers (which inherit
# them: shared memory cannot be pickled into a worker, only inherited).
SHARED: dict = {}


class CountProgress(PipelineStep):
    """Adds each document to the SHARED counters, which the parent process draws as its progress bar
    (local executor only)."""

    name = "📊 progress"
    type = "📊 - PROGRESS"

    def run(self, data, rank: int = 0, world_size: int = 1):
        docs, chars = SHARED["docs"], SHARED["chars"]
        for doc in data:
            with docs.get_lock():
                docs.value += 1
            with chars.get_lock():
                chars.value += len(doc.text)
            yield doc
