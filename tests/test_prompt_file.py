"""The prompt file's two forms: one prompt a line, or JSONL entries that may name a conditioning
image (image-to-video) or an edit's sources, mask and target; images travel as ``Prompt`` strings,
and every bad entry is one line."""

from __future__ import annotations

import pickle

import pytest
import torch

from align.errors import ConfigError
from align.prompts import check_prompt_images, prompt_list
from pipelines.base import Prompt, load_image, prompt_images


def _png(path, colour=(255, 0, 0), size=(8, 6)):
    from PIL import Image

    Image.new("RGB", size, colour).save(path)
    return path


def test_jsonl_entries_carry_their_images(tmp_path):
    (tmp_path / "frames").mkdir()
    red = _png(tmp_path / "frames" / "red.png")
    file = tmp_path / "prompts.jsonl"
    file.write_text('{"prompt": "a red ball rolls", "image": "frames/red.png"}\n\n'
                    f'{{"prompt": "it bounces", "image": "{red}"}}\n')
    prompts = prompt_list(None, str(file), ["unused"])
    assert prompts == ["a red ball rolls", "it bounces"]  # plain strings to everything else
    assert all(isinstance(p, Prompt) and p.image == str(red) for p in prompts)  # relative to the file's folder
    again = pickle.loads(pickle.dumps(prompts[0]))
    assert again == prompts[0] and again.image == prompts[0].image
    assert prompt_images(prompts) == [str(red), str(red)]
    image = load_image(prompt_images(prompts)[0], 4, 4)
    assert image.shape == (3, 4, 4) and torch.allclose(image[0], torch.ones(4, 4)) and image[1:].abs().max() == 0


def test_edit_entries_carry_several_sources_a_mask_and_a_target(tmp_path):
    red, blue = _png(tmp_path / "red.png"), _png(tmp_path / "blue.png", (0, 0, 255))
    mask, target = _png(tmp_path / "mask.png", (255, 255, 255)), _png(tmp_path / "target.png", (0, 255, 0))
    file = tmp_path / "edits.jsonl"
    file.write_text('{"prompt": "put the red one on the blue one", "image": ["red.png", "blue.png"]}\n'
                    '{"prompt": "make it green", "image": "red.png", "mask": "mask.png", "target": "target.png"}\n')
    several, masked = prompt_list(None, str(file), [])
    assert several.image == [str(red), str(blue)] and several.source == str(red) and several.mask is None
    assert (masked.image, masked.mask, masked.target) == (str(red), str(mask), str(target))
    again = pickle.loads(pickle.dumps(masked))
    assert (again.image, again.mask, again.target) == (masked.image, masked.mask, masked.target)


def test_plain_lines_have_no_images(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("a cat\n\n a dog \n")
    prompts = prompt_list(None, str(file), ["unused"])
    assert prompts == ["a cat", "a dog"] and prompt_images(prompts) is None


@pytest.mark.parametrize("line, expected", [
    ('{"prompt": "a cat"', "line 2: not JSON"),
    ('{"text": "a cat"}', 'line 2: expected an object with a non-empty "prompt" string'),
    ('{"prompt": "a cat", "img": "x.png"}', "line 2: unknown key 'img' (keys: prompt, image, mask, target)"),
    ('{"prompt": "a cat", "image": "missing.png"}', "line 2: image not found: "),
    ('{"prompt": "a cat", "image": ["missing.png"]}', "line 2: image not found: "),
    ('{"prompt": "a cat", "image": []}', "line 2: image is an empty list"),
    ('{"prompt": "a cat", "mask": "x.png"}', "line 2: a mask or target needs the \"image\" it edits"),
    ('{"prompt": "a cat", "image": 3}', "line 2: image must be a path (a string), got 3"),
])
def test_a_bad_entry_is_one_line_naming_its_line(tmp_path, line, expected):
    file = tmp_path / "prompts.jsonl"
    file.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ConfigError) as err:
        prompt_list(None, str(file), [])
    assert expected in str(err.value) and str(file) in str(err.value) and "\n" not in str(err.value)


def test_images_must_fit_the_models_tasks():
    with_images = [Prompt("a", "x.png"), Prompt("b", "y.png")]
    check_prompt_images(with_images, "ti2v_model", ("t2v", "i2v"))
    check_prompt_images(["a", "b"], "ti2v_model", ("t2v", "i2v"))
    with pytest.raises(ConfigError, match="2 prompts name an image, but the 't2v_model' model takes none"):
        check_prompt_images(with_images, "t2v_model", ("t2v",))
    with pytest.raises(ConfigError, match="1 of 2 prompts have no image"):
        check_prompt_images([Prompt("a", "x.png"), "b"], "ti2v_model", ("t2v", "i2v"))
    with pytest.raises(ConfigError, match="eval_prompt_file: the 'i2v_model' model animates an image"):
        check_prompt_images(["a"], "i2v_model", ("i2v",), field="eval_prompt_file")
    check_prompt_images(with_images, "kontext", ("t2i", "edit"))  # an editing model that also draws from text
    check_prompt_images(["a"], "kontext", ("t2i", "edit"))
    with pytest.raises(ConfigError, match="prompt_file: the 'edit_model' model edits an image"):
        check_prompt_images(["a"], "edit_model", ("edit",))
    with pytest.raises(ValueError, match="prompt 'b' has no image"):
        prompt_images([Prompt("a", "x.png"), "b"])
