"""docs/trainers/: every page is what scripts/trainer_docs.py writes from the trainers' config
dataclasses (their ``#:`` field comments and defaults), and a changed config makes its page stale."""

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

from align.sampling.rollout import RolloutConfig
from align.trainers import TRAINERS, trainer_module
from align.trainers.config import TrainerConfig

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("trainer_docs", ROOT / "scripts" / "trainer_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


docs = load_script()
FlowGRPOConfig = trainer_module("flow_grpo").CONFIG


@dataclass
class WithNewField(FlowGRPOConfig):
    #: a test-only option: widgets made
    #: per iteration
    widgets: int = 3


@dataclass
class WithNewDefaults(FlowGRPOConfig):
    #: the run's length in this test
    iterations: int = 7
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_steps=12, kernel="flow_grpo",
                                                                         cfg_split=True))
    adv_std: str = "group"


def generated_on_disk(name: str) -> str:
    return docs.page_path(name).read_text().split(docs.MARKER, 1)[1]


def test_every_page_is_fresh(capsys):
    assert docs.main(["--check"]) == 0, (f"out of date: {capsys.readouterr().out.split()} "
                                         f"(run python scripts/trainer_docs.py)")


def test_the_index_links_every_page():
    index = (docs.DOCS / "README.md").read_text()
    assert [n for n in [docs.COMMON, *TRAINERS] if f"({n}.md)" not in index] == []


def test_a_new_field_makes_the_page_stale():
    rendered = docs.generated_part("flow_grpo", WithNewField)
    on_disk = generated_on_disk("flow_grpo")
    row = "| `widgets` | `3` | a test-only option: widgets made per iteration |"
    assert row in rendered.splitlines()
    assert rendered != on_disk
    assert set(rendered.splitlines()) - set(on_disk.splitlines()) == {row}


def test_a_changed_default_shows_in_its_row():
    rendered = docs.generated_part("flow_grpo", WithNewDefaults).splitlines()
    meaning = {r.name: r.meaning for r in docs.options(TrainerConfig)}
    # a shared field redeclared with a comment of its own: its default, the shared one, its comment
    assert "| `iterations` | `7` | `100` | the run's length in this test |" in rendered
    # a nested block: the changed value under its dotted name, the meaning from the block's class
    assert f"| `rollout.num_steps` | `12` | `10` | {docs.cell(meaning['rollout.num_steps']) or docs.NO_COMMENT} |" in rendered
    # a trainer's own field redeclared without a comment keeps the base declaration's
    own = next(line for line in rendered if line.startswith("| `adv_std` |"))
    assert own.startswith('| `adv_std` | `"group"` | advantages (r - prompt mean)')
    assert own != next(line for line in generated_on_disk("flow_grpo").splitlines() if line.startswith("| `adv_std` |"))


def test_defaults_render_as_yaml():
    assert [docs.render(v) for v in (1e-4, 3e-4, 0.04, 5.0, 0, None, True, "flow_grpo", [0.9, 0.999], {})] == [
        "1e-4", "3e-4", "0.04", "5.0", "0", "null", "true", '"flow_grpo"', "[0.9, 0.999]", "{}"]
    assert docs.render({"eta": 1.0}) == "{eta: 1.0}"
    assert docs.render([f"p{i}" for i in range(40)], compact=True).endswith("…] (40 items)")
    assert docs.cell("a | b, `x | y`, <dir>, **kw") == r"a \| b, `x \| y`, &lt;dir>, \*\*kw"


def test_regenerating_keeps_the_hand_written_part(tmp_path, monkeypatch):
    monkeypatch.setattr(docs, "DOCS", tmp_path)
    (tmp_path / "flow_grpo.md").write_text("# Prose\n\nkept as written\n\n" + docs.MARKER + "\nold table\n")
    docs.write_pages()
    page = (tmp_path / "flow_grpo.md").read_text()
    assert page.startswith("# Prose\n\nkept as written\n\n" + docs.MARKER + "\n")
    assert "old table" not in page and page.endswith(docs.generated_part("flow_grpo"))
    starter = (tmp_path / "dpo.md").read_text()  # no page yet: a starter hand-written part
    assert starter.startswith("# `dpo`") and "align train dpo --config configs/methods/dpo.yaml" in starter
    assert docs.stale_pages() == []
    (tmp_path / "dpo.md").write_text(starter.replace("| `beta` |", "| `beta_renamed` |"))
    assert docs.stale_pages() == [tmp_path / "dpo.md"]
