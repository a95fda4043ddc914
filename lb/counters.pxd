# Types for the compiled build of lb/counters.py (see setup.py, lb/compiled.py): the
# request path adds to these as C integers. Keep in step with FIELDS.

cdef class Counters:
    cdef public long long stot
    cdef public long long bin
    cdef public long long bout
    cdef public long long dreq
    cdef public long long ereq
    cdef public long long econ
    cdef public long long eresp
    cdef public long long wretr
    cdef public long long wredis
    cdef public long long lbtot
    cdef public long long req_tot
    cdef public long long cli_abrt
    cdef public long long srv_abrt
    cdef public list hrsp
