export { connect, AgentBusClient } from './client.js';
export type {
  ClientEvents,
  CloseEvent,
  ConnectOptions,
  ConnectionState,
  Handler,
  HandlerResult,
  ReconnectOptions,
  ReplyInit,
} from './client.js';
export { observe, Observer } from './observer.js';
export type { ObserveOptions, ObserverEvents } from './observer.js';
export { RestClient } from './rest.js';
export type {
  DeadLetter,
  FetchLike,
  HistoryPage,
  HistoryQuery,
  Inbox,
  InboxQuery,
  MessageDetail,
  ProjectStats,
  PublishInit,
  RestOptions,
} from './rest.js';
export { AgentBusError } from './errors.js';
export { Emitter } from './emitter.js';
export type { Listener } from './emitter.js';
export type { WebSocketConstructor, WebSocketLike } from './transport.js';
export type {
  AckMode,
  Agent,
  ErrorFrame,
  Json,
  JsonObject,
  Message,
  ObserverWelcome,
  Priority,
  Project,
  RequestFields,
  SendInit,
  SentReceipt,
  StoredMessage,
  Welcome,
} from './types.js';
export {
  BaseAgent,
  MessageBus,
  MessagePriority,
  MessageType,
  setDefaultMessageBus,
  toAgentMessage,
  toMessageResponse,
} from './seed004.js';
export type {
  AgentConfig,
  AgentMessage,
  AgentType,
  AgentbusInfo,
  MessageBusConfig,
  MessageBusEvents,
  MessageBusStats,
  MessageHandler,
  MessageResponse,
} from './seed004.js';
