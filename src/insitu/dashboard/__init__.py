"""A live dashboard of a run (``insitu simulate --dashboard``, ``insitu server --dashboard``) and of a finished
run's folder (``insitu dashboard RUN_DIR``). The feed needs only the standard library; serving it needs
``pip install 'insitu[dashboard]'`` (Starlette and uvicorn), imported only when a dashboard starts."""

from insitu.dashboard.feed import DashboardFeed

__all__ = ["DashboardFeed"]
