package qmp

import "context"

// MemoryBackend is a host memory object for a memory device such as virtio-mem.
type MemoryBackend struct {
	ID   string
	Size uint64 // bytes
	// Shared allocates it with memfd and share=on, as vhost-user devices
	// (virtio-fs) need for every part of guest RAM they may touch.
	Shared bool
}

// ObjectAddMemoryBackend creates a memory backend (object-add).
func (m *Monitor) ObjectAddMemoryBackend(ctx context.Context, b MemoryBackend) error {
	args := struct {
		QOMType string `json:"qom-type"`
		ID      string `json:"id"`
		Size    uint64 `json:"size"`
		Share   bool   `json:"share,omitempty"`
	}{QOMType: "memory-backend-ram", ID: b.ID, Size: b.Size}
	if b.Shared {
		args.QOMType, args.Share = "memory-backend-memfd", true
	}
	return m.run(ctx, "object-add", b.ID, args, nil)
}

// ObjectDel deletes a QOM object created with object-add (object-del).
func (m *Monitor) ObjectDel(ctx context.Context, id string) error {
	return m.run(ctx, "object-del", id, idArgs{id}, nil)
}
