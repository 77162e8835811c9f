"""The contract is stated once: the leaf module's imports, the layering of runtime and build code, the docs' table,
and the front model and client that derive from it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np

from tritonllm import contract
from tritonllm.client.api import GenerationParams, request_arrays
from tritonllm.python_backends.front import ENSEMBLE_INPUTS, REQUEST_INPUTS

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Every module a Python file imports, at any depth (relative imports resolved within the tritonllm package)."""
    package = {"builders": "tritonllm.builders", "python_backends": "tritonllm.python_backends",
               "client": "tritonllm.client", "tritonllm": "tritonllm"}.get(path.relative_to(ROOT).parts[0], "")
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            modules.add(base)
            modules.update(f"{base}.{alias.name}" for alias in node.names)
    return modules


def test_the_contract_module_is_a_leaf_of_the_standard_library():
    third_party = {module.split(".")[0] for module in imported_modules(ROOT / "tritonllm" / "contract.py")}
    assert third_party - {"__future__"} <= set(sys.stdlib_module_names)


def test_runtime_code_never_imports_build_code():
    runtime = sorted((ROOT / "python_backends").glob("*.py")) + sorted((ROOT / "model_repository").glob("*/1/*.py"))
    offenders = {str(path.relative_to(ROOT)): sorted(module for module in imported_modules(path)
                                                    if module.startswith(("tritonllm.builders", "builders")))
                 for path in runtime}
    assert {path: modules for path, modules in offenders.items() if modules} == {}


def test_docs_hold_the_contract_table():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    start = text.index("<!-- contract-table")
    table = text[text.index("\n", start) + 1:text.index("<!-- /contract-table -->")].strip()
    assert table == contract.contract_table()


def test_front_model_and_client_derive_their_types_from_the_contract():
    assert list(ENSEMBLE_INPUTS) == [tensor.name for tensor in contract.ENSEMBLE_INPUTS]
    assert list(REQUEST_INPUTS) == [tensor.name for tensor in contract.FRONT_INPUTS]
    front = contract.tensors_by_name(contract.FRONT_INPUTS)
    params = GenerationParams(max_tokens=3, temperature=0.5, top_p=0.9, top_k=4, seed=7, min_tokens=1, end_id=2,
                              pad_id=2, stop_words=["x"], bad_words=["y"], apply_chat_template=True, tenant="t",
                              cache="bypass")
    arrays = request_arrays("hello", params, stream=True)
    assert set(arrays) <= set(front)
    for name, (wire_type, array) in arrays.items():
        assert (wire_type, array.dtype) == (front[name].wire_type, np.dtype(front[name].numpy_dtype)), name


def test_rendered_tensor_blocks_parse_as_model_inputs():
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    config = text_format.Parse(f"input [\n{contract.render_tensors(contract.FRONT_INPUTS)}\n]", mc.ModelConfig())
    assert [(io.name, mc.DataType.Name(io.data_type), list(io.dims), io.optional) for io in config.input] == [
        (t.name, t.data_type, list(t.dims), t.optional) for t in contract.FRONT_INPUTS]
