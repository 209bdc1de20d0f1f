"""The web layer: the FastAPI app (:mod:`.server`); who is asking (:mod:`.auth`, :mod:`.sessions`,
:mod:`.throttle`, :mod:`.edges`); the JSON routes (:mod:`.api_review`, :mod:`.study_routes`); the three Gradio
screens (:mod:`.ui_review`, :mod:`.ui_dashboard`, :mod:`.ui_study`), sharing :mod:`.common`.

It calls the services of :mod:`annotate`; of this package the services use only :mod:`.sessions` (revoking a
user's sessions when an account or an invitation is closed).
"""
