"""BIG's Jina face: the Executor that `config.yml` loads (`executor.executor.BIGExecutor`) and the gateway that the
flow files use (`executor.gateway.BIGGateway`), each imported by its module name so that a gateway process does not
load the service. The service itself is the Jina-free `big` package."""
