# Types for the compiled build of lb/counters.py (see setup.py, lb/compiled.py): the
# request path adds to a block of shared memory as a C array. (The constants stay Python
# objects here, for the modules that import them; those declare their own C copies.)

cdef class Counters:
    cdef public long long[:] w
    cpdef response(self, int status)
