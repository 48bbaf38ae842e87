"""Serving: the generation engine (:mod:`lmforge.generation.engine`) in a supervised process of its
own (:mod:`.process`, with :mod:`.supervision`, :mod:`.child`, :mod:`.messages` and :mod:`.frames`),
and the asyncio front every engine shares (:mod:`.aio`). The interface, events and errors are
:mod:`lmforge.generation.interface`.

Core package (torch, numpy, stdlib): the BentoML service in ``services/`` is one user of it; the
tests drive it directly.
"""
