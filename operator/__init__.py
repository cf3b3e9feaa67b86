"""The Tandem Kubernetes operator (``tandem operator``): InferenceService -> Deployments and friends.

Modules, in the order data flows through them:

* ``spec.py``      the InferenceService spec as typed dataclasses (parse, defaults, validation);
* ``pods.py``      pure builders of the prefill / decode / router Deployments;
* ``objects.py``   pure builders of the Services, ConfigMap, RBAC, PDBs, HPAs, PodMonitor;
* ``reconcile.py`` applies the desired list (create / patch drift / delete stale) and the status;
* ``status.py``    pure computation of conditions and replica counts;
* ``kube.py``      a generic REST layer over the ``kubernetes`` client;
* ``handlers.py``  the kopf handlers (thin: they call ``reconcile``);
* ``cli.py``       ``tandem operator`` / ``python -m tandem.operator``: flags, then ``kopf.run``.

Importing this package does not import kopf: the builders are usable (and tested) without it.
"""

# This folder is only ever meant to be ``tandem.operator`` (pyproject's package-dir). But with the
# repository root on sys.path (``python -c``/``python -m`` run from the root), a plain
# ``import operator`` -- done by enum, re, json and most of the stdlib -- would find this folder
# first and break. So when loaded under the top-level name we become the standard library's
# ``operator`` (its source runs in this module), instead of shadowing it.
if __name__ == "operator":
    import os as _os  # always already imported at interpreter start-up

    __file__ = _os.path.join(_os.path.dirname(_os.__file__), "operator.py")
    with open(__file__) as _f:
        exec(compile(_f.read(), __file__, "exec"))
    del _os, _f
