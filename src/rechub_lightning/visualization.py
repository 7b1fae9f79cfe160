"""Model graphs, drawn with torchview: Torch-RecHub's ``utils.visualization``.

Needs the ``visualization`` extra (``pip install 'rechub-lightning[visualization]'``: torchview and
the graphviz Python package). Building the graph and saving its Graphviz source (``.gv``/``.dot``)
need nothing else; rendering an image (``.pdf``, ``.png``, ``.svg``, ...) or opening a viewer
needs Graphviz's ``dot`` program (``apt install graphviz``, ``brew install graphviz``).

The trainers' ``visualization(...)`` methods call :func:`visualize_model` on their model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .export import dummy_inputs, model_features

__all__ = ["visualize_model", "display_graph"]

_INSTALL = "pip install 'rechub-lightning[visualization]' (torchview and graphviz)"
_SOURCE_FORMATS = ("gv", "dot")


def _draw_graph() -> Any:
    try:
        from torchview import draw_graph
    except ImportError as e:
        raise ImportError(f"model visualization needs torchview: {_INSTALL}") from e
    return draw_graph


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ in ("ZMQInteractiveShell", "TerminalInteractiveShell")


def _needs_dot(action: str, error: Exception) -> RuntimeError:
    return RuntimeError(
        f"{action} needs Graphviz's `dot` program, which was not found ({error}); install Graphviz "
        "(apt install graphviz / brew install graphviz / choco install graphviz) or save the graph's "
        "source with a .gv or .dot save_path"
    )


def _save(visual: Any, save_path: str | os.PathLike[str]) -> None:
    import graphviz

    path = os.fspath(save_path)
    directory = os.path.dirname(path) or "."
    stem, ext = os.path.splitext(os.path.basename(path))
    fmt = ext.lstrip(".").lower() or "pdf"
    if fmt not in _SOURCE_FORMATS and fmt not in graphviz.FORMATS:
        raise ValueError(f"save_path={path!r}: Graphviz cannot write {fmt!r} files (e.g. .pdf, .png, .svg, .gv)")
    os.makedirs(directory, exist_ok=True)
    if fmt in _SOURCE_FORMATS:
        visual.save(filename=stem + ext, directory=directory)
        return
    with tempfile.TemporaryDirectory(prefix="rechub-graph-") as tmp:  # no half-written files on failure
        try:
            out = visual.render(filename=stem, directory=tmp, format=fmt, cleanup=True)
        except graphviz.ExecutableNotFound as e:
            raise _needs_dot(f"saving {path!r}", e) from e
        shutil.move(out, os.path.join(directory, os.path.basename(out)))


def visualize_model(
    model: nn.Module,
    input_data: Mapping[str, Any] | None = None,
    batch_size: int = 2,
    seq_length: int = 10,
    depth: int = 3,
    show_shapes: bool = True,
    expand_nested: bool = True,
    save_path: str | os.PathLike[str] | None = None,
    graph_name: str = "model",
    device: str | torch.device = "cpu",
    dpi: int = 300,
    **kwargs: Any,
) -> Any:
    """Draw a model's computation graph (Torch-RecHub's ``visualize_model``, same arguments).

    Args:
        model: A model of this library (or any model whose ``*features`` attributes list its
            features); the forward pass runs once on ``input_data``, in eval mode unless
            ``mode="train"`` is passed through ``kwargs``.
        input_data: ``{feature name: tensor}``; default: valid random ids / values for the
            model's features (``batch_size`` rows, histories of ``seq_length``).
        batch_size: Rows of the generated input.
        seq_length: History length of the generated input.
        depth: Module nesting shown (``-1``: all).
        show_shapes: Tensor shapes on the nodes.
        expand_nested: Draw nested modules as dashed clusters.
        save_path: Where to write the graph; the extension picks the format (``.pdf`` when
            none; ``.gv``/``.dot`` write the Graphviz source and need no ``dot``). ``None``:
            shown inline in a notebook, else opened in the system viewer, as in the reference.
        graph_name: Name of the graph.
        device: Device the forward pass runs on; the model is moved back afterwards.
        dpi: Resolution of rendered images.
        **kwargs: Passed to ``torchview.draw_graph``.

    Returns:
        torchview's ``ComputationGraph`` (``.visual_graph`` is the ``graphviz.Digraph``).

    Raises:
        ImportError: torchview or graphviz is not installed.
        ValueError: Bad ``batch_size``/``seq_length``/``dpi``/``save_path``, or the model's
            features cannot be found and ``input_data`` is not given.
        RuntimeError: Rendering or viewing without Graphviz's ``dot`` program.
    """
    for name, value in (("batch_size", batch_size), ("seq_length", seq_length), ("dpi", dpi)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    draw_graph = _draw_graph()
    model = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
    if input_data is None:
        x = dummy_inputs(model_features(model), batch_size=batch_size, seq_length=seq_length)
    else:
        x = {k: torch.as_tensor(v) for k, v in input_data.items()}
    device = torch.device(device)
    x = {k: v.to(device) for k, v in x.items()}
    param = next(model.parameters(), None)
    device_before = param.device if param is not None else torch.device("cpu")
    try:
        # A 1-tuple: torchview calls model(*input_data), and our models take one dict.
        graph = draw_graph(
            model, input_data=(x,), graph_name=graph_name, depth=depth, device=device,
            expand_nested=expand_nested, show_shapes=show_shapes, save_graph=False, **kwargs,
        )
    finally:
        model.to(device_before)  # torchview restores the train/eval mode itself
    graph.visual_graph.graph_attr["dpi"] = str(dpi)
    if save_path is not None:
        _save(graph.visual_graph, save_path)
    elif _in_notebook():
        display_graph(graph)
    else:
        import graphviz

        try:  # rendered in a temporary folder, not the working directory
            graph.visual_graph.view(directory=tempfile.mkdtemp(prefix="rechub-graph-"), cleanup=True)
        except graphviz.ExecutableNotFound as e:
            raise _needs_dot("opening the graph in a viewer", e) from e
    return graph


def display_graph(graph: Any, format: str = "png") -> Any:
    """Show a graph from :func:`visualize_model` inline in a notebook; returns its ``graphviz.Digraph``."""
    import graphviz

    graphviz.set_jupyter_format(format)
    visual = graph.visual_graph
    try:
        from IPython.display import display
    except ImportError:
        return visual
    display(visual)
    return visual
