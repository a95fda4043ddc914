# Types for the compiled build of lb/balance.py (see setup.py, lb/compiled.py): the
# round-robin walk every request takes. Keep in step with __slots__ and __init__.

from lb.backend cimport Backend


cdef class Context:
    cdef public bytes client_ip
    cdef public object _path
    cdef public object head


cdef class RoundRobin:
    cdef public Backend backend
    cdef public bint static
    cdef public tuple orders
    cpdef pick(self, Context context, exclude)
    cpdef pick_at(self, position, exclude)


cdef class Hash(RoundRobin):
    cdef public object key
    cpdef pick(self, Context context, exclude)
