"""The example config in the repo must stay true to the code."""

from __future__ import annotations

import shutil
from pathlib import Path

from agent.config import dump, load

ROOT = Path(__file__).resolve().parent.parent


def test_the_example_config_and_secrets_load(tmp_path):
    secrets = tmp_path / "secrets.toml"
    shutil.copy(ROOT / "config" / "secrets.example.toml", secrets)
    secrets.chmod(0o600)
    config = load(ROOT / "config" / "scanbox.example.toml", secrets)
    assert config.platform.rhc.user_pwd.get_secret_value() == "change-me"
    assert set(config.api.clients) == {"his", "technician"}
    assert config.sources["counter"].driver == "serial_scanner"
    assert config.site.sam == "45600001X5500"
    printed = repr(dump(config))
    assert "change-me" not in printed and "a-long-random-string" not in printed


def test_the_platform_kind_examples_load(tmp_path):
    loaded = {}
    for kind in ("wondersgroup", "fsjson"):
        secrets = tmp_path / ("%s.secrets.toml" % kind)
        shutil.copy(ROOT / "config" / "examples" / ("%s.secrets.toml" % kind), secrets)
        secrets.chmod(0o600)
        loaded[kind] = load(ROOT / "config" / "examples" / ("%s.toml" % kind), secrets)
        assert loaded[kind].platform.kind == kind
        assert "change-me" not in repr(dump(loaded[kind]))
    assert loaded["wondersgroup"].platform.wondersgroup.pass_word.get_secret_value() == "change-me"
    assert loaded["wondersgroup"].platform.wondersgroup.machine_code == "SB-0001"
    assert loaded["fsjson"].platform.fsjson.app_secret.get_secret_value() == "change-me"


def test_the_commented_source_examples_are_valid():
    """Each commented `# [sources.NAME]` block, uncommented, is a valid section of its driver."""
    import re
    import tomllib

    from agent.config import validate_source

    text = (ROOT / "config" / "scanbox.example.toml").read_text(encoding="utf-8")
    blocks = re.findall(r"^# \[sources\.([a-z0-9_-]+)\]\n((?:#.*\n)+)", text, re.M)
    drivers = set()
    for name, body in blocks:
        lines = [line[2:] for line in body.splitlines() if line.startswith("# ") and not line.startswith("#  ")]
        options = validate_source(name, tomllib.loads("\n".join(lines)))
        drivers.add(options.driver)
    assert drivers == {"hid", "camera", "idcard", "pcsc"}


def test_the_commented_qr_block_is_the_defaults_with_every_key():
    """`# [platform.qr]` in the example, uncommented, is exactly what the box uses unset."""
    import re
    import tomllib

    from agent import schema
    from agent.config import QrRules

    text = (ROOT / "config" / "scanbox.example.toml").read_text(encoding="utf-8")
    start = text.index("# [platform.qr]\n")
    lines = []
    for line in text[start:].splitlines():
        if not line.startswith("#"):
            break
        body = line[2:]
        if re.match(r"(\[|[a-z_]+ = )", body):
            lines.append(re.sub(r"'\s+#.*$", "'", body))
    block = tomllib.loads("\n".join(lines))["platform"]["qr"]
    assert set(block) == set(schema.fields(QrRules))
    assert schema.convert(block, QrRules) == QrRules()
