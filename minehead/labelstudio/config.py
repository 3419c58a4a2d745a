"""The labelling config of a Label Studio project, as far as minehead uses it.

The config minehead expects is the one drafting writes (minehead.drafts.formats.labelstudio_config):
one <Image name=… value="$key"/> and one <RectangleLabels> or <PolygonLabels> over it, whose
<Label value=…/> are the recipe set's classes. The XML comes from the Label Studio instance, so
it is read with regular expressions for the few attributes needed, never with an XML parser
that could expand entities.
"""

from __future__ import annotations

import dataclasses
import html
import re

from minehead.core.errors import FailedPrecondition, InvalidArgument

MAX_CONFIG_CHARS = 1 << 20
_TAG = re.compile(r"<(RectangleLabels|PolygonLabels)\b([^>]*)>(.*?)</\1\s*>", re.S)
_IMAGE = re.compile(r"<Image\b([^>]*)/?>", re.S)
_LABEL = re.compile(r'<Label\s[^>]*?\bvalue="([^"]*)"')


def _attr(attrs: str, name: str) -> str:
    m = re.search(rf'\b{name}="([^"]*)"', attrs)
    return html.unescape(m.group(1)) if m else ""


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    labels: list[str]
    polygons: bool  # PolygonLabels (else RectangleLabels)
    from_name: str  # the labels tag's name
    to_name: str  # the Image tag's name
    data_key: str  # the task data key of the image ($image -> "image")


def labels_of(text: str) -> list[str]:
    """Every <Label value=…> in order (a labelmap from a config file)."""
    return [html.unescape(v) for v in _LABEL.findall(text)]


def parse_config(text: str) -> LabelConfig:
    """The first RectangleLabels/PolygonLabels tag and the Image it labels; InvalidArgument when
    the config has none (e.g. a classification project)."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument("the project has no labelling config")
    if len(text) > MAX_CONFIG_CHARS:
        raise InvalidArgument(f"the labelling config is over {MAX_CONFIG_CHARS} characters")
    m = _TAG.search(text)
    if m is None:
        raise InvalidArgument("the labelling config has no <RectangleLabels> or <PolygonLabels>: minehead drafts boxes "
                              "or polygons (use the labelstudio_config.xml that `minehead draft` writes)")
    tag, attrs, body = m.groups()
    from_name, to_name = _attr(attrs, "name"), _attr(attrs, "toName")
    images = {_attr(a, "name"): _attr(a, "value") for a in _IMAGE.findall(text)}
    if to_name not in images:
        raise InvalidArgument(f"the labelling config's <{tag} name={from_name!r}> labels {to_name!r}, which is no <Image> "
                              f"(images: {', '.join(images) or 'none'})")
    value = images[to_name]
    if not value.startswith("$") or len(value) < 2:
        raise InvalidArgument(f"<Image name={to_name!r}> takes its image from {value!r}; expected a task field like $image")
    return LabelConfig(labels=labels_of(body), polygons=tag == "PolygonLabels", from_name=from_name, to_name=to_name,
                       data_key=value[1:])


def check_labels(config: LabelConfig, classes: list[str], recipe_set: str) -> None:
    """The project's labels must be the set's classes: predictions name only the set's classes,
    and corrections train a head on exactly those. The error names both lists."""
    if set(config.labels) != set(classes):
        missing, extra = sorted(set(classes) - set(config.labels)), sorted(set(config.labels) - set(classes))
        raise FailedPrecondition(
            f"the project's labels ({', '.join(config.labels) or 'none'}) do not match the classes of {recipe_set} "
            f"({', '.join(classes)})" + (f"; missing from the project: {', '.join(missing)}" if missing else "")
            + (f"; not in the recipe set: {', '.join(extra)}" if extra else "")
            + ". Use the labelstudio_config.xml that `minehead draft` writes for this set")
