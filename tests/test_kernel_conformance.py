"""Jupyter messaging conformance of the Bastion kernel (jupyter_kernel_test).

jupyter_kernel_test validates every message against the messaging spec.
The kernel is the installed ``bastion`` kernelspec, connected to a real
executor (tests/conftest.py) exactly as in test_kernel.py.
"""
from __future__ import annotations

import jupyter_kernel_test
import pytest

from test_kernel import bastion_kernel, connect_scientist

pytestmark = pytest.mark.slow  # starts services or takes seconds: not in the fast tier


class BastionKernelTests(jupyter_kernel_test.KernelTests):
    kernel_name = "bastion"
    language_name = "bastion"
    file_extension = ".py"

    # print writes to stdout; nothing in the language writes to stderr.
    code_hello_world = 'print("hello, world")'
    code_page_something = "col?"

    completion_samples = [
        {"text": "pl.le", "matches": {"len"}},
        {"text": 'dataset("patients_o', "matches": {"patients_open"}},
    ]
    complete_code_samples = ["1 + 2", 'df = dataset("patients")', 'col("age").mean()']
    incomplete_code_samples = ['dataset("patients").filter(', "x = (1,", "col(\"a\") + (\n"]
    invalid_code_samples = ["1 +* 2", ")", "x = = 1"]

    code_inspect_sample = "col"
    code_generate_error = "import os"
    code_execute_result = [
        {"code": "1 + 2", "result": "3"},
        {"code": "2 ** 10", "result": "1024"},
        {"code": "datasets()", "mime": "text/html"},
        {"code": 'dataset("patients").group_by("sex").agg(pl.len()).fetch()',
         "mime": "application/vnd.dataresource+json"},
    ]
    # display() shows a value as display_data (a held fetch's waiting status is display_data too,
    # which test_kernel.py checks with an owner approving it).
    code_display_data = [{"code": "display(datasets())", "mime": "text/html"}]
    supported_history_operations = ("tail", "range", "search")
    code_history_pattern = "1 ?*"

    @classmethod
    def setUpClass(cls) -> None:
        """The kernel is started by the fixture below, once the executor is up."""

    @classmethod
    def tearDownClass(cls) -> None:
        """Stopped by the fixture below."""

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _kernel(cls, executor, tmp_path_factory):
        config, jupyter_path = connect_scientist(executor, tmp_path_factory.mktemp("conformance"), "dora")
        with bastion_kernel(config, jupyter_path) as (km, kc):
            cls.km, cls.kc = km, kc
            yield
