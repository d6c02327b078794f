"""The pyfunc model's code, logged by file (MLflow models-from-code, :func:`cdsr.track.pyfunc.log_pyfunc`).

Loading a registered model runs this file and the ``cdsr`` code logged beside it: no pickled
Python object is deserialised. Versions logged before this file existed hold a cloudpickled
:class:`~cdsr.track.pyfunc.CDSRRecommender` and still load (MLflow unpickles them).
"""

import mlflow

from cdsr.track.pyfunc import CDSRRecommender

mlflow.models.set_model(CDSRRecommender())
