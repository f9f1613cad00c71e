"""papermill support: ``papermill NB OUT -k bastion -p NAME VALUE`` with no other flag.

papermill writes the ``-p`` parameters into a cell of the notebook's
language, with a *translator* it looks up by kernel name, then by language.
It knows no ``bastion`` translator, and papermill 2.7 reads translators from
no entry point: only engines are plugins (the ``papermill.engine`` entry
point group, loaded whenever papermill is imported).  So Bastion registers
an engine, :class:`BastionEngine` (papermill's own nbclient engine under the
name ``bastion``; the default engine stays papermill's), whose module
registers :class:`BastionTranslator` for the ``bastion`` kernel as it loads.

The kernel keeps its own language name, ``bastion``: a front end that saw
``python`` would send it Python to run (variable explorers, environment
checks), which the kernel refuses.

A parameter cell is plain assignments of literals, which the language
accepts as they are: ``NAME = 3``, ``NAME = "text"``, ``NAME = [1, 2]``,
``NAME = {"a": 1}``, ``NAME = True``, ``NAME = None``.  Non-finite floats
have no literal in the language and are refused when the cell runs.
"""
from __future__ import annotations

from papermill.engines import NBClientEngine
from papermill.translators import PythonTranslator, papermill_translators

KERNEL_NAME = "bastion"


class BastionTranslator(PythonTranslator):
    """Parameters as Bastion assignments: Python's literal syntax, without reformatting by black."""

    @classmethod
    def codify(cls, parameters: dict, comment: str = "Parameters") -> str:
        """``# Parameters`` and one ``NAME = literal`` line per parameter."""
        content = f"{cls.comment(comment)}\n"
        for name, value in parameters.items():
            content += f"{cls.assign(name, cls.translate(value))}\n"
        return content


class BastionEngine(NBClientEngine):
    """papermill's nbclient engine; registered only so that papermill imports this module."""


papermill_translators.register(KERNEL_NAME, BastionTranslator)
