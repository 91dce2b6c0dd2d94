"""The teacher server: `kdserve-teacher` (`cli`), its config, transports and inference path.

A request goes transport (`http_api`, `grpc_api`) -> decode and validate (`shared.wire`,
`shared.contract`) -> `lifecycle` (authorize, route, wait) -> `batcher` -> `engine`
(preprocess, forward) -> `outputs` (combine, temper) -> encode. `registry` builds the models
and ensembles from `config`; `serve` runs both transports in one process. Nothing below the
transports imports grpc or fastapi.
"""
