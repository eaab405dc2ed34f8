"""Ground floor: helpers every stage may use and that import nothing else of the package: safe
file reading and atomic writing (:mod:`.files`), archives (:mod:`.archive`), folder names and
locks, the cache root (:mod:`.paths`), seeds, usable cores, YAML parsing, hook names
(:mod:`.hooks`) and the one registry mechanism (:mod:`.registry`)."""
